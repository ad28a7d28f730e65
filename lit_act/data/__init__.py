"""Lightning DataModules on data that ships with the install (digits, pysource, teacher_student) and optional
torchvision datasets."""

from lit_act.data.digits import DigitsDataModule
from lit_act.data.pysource import PySourceDataModule
from lit_act.data.resumable import ResumableDataLoader, ResumableSampler
from lit_act.data.teacher_student import TeacherStudentDataModule
from lit_act.data.vision import TorchvisionDataModule

__all__ = ["DigitsDataModule", "PySourceDataModule", "ResumableDataLoader", "ResumableSampler",
           "TeacherStudentDataModule", "TorchvisionDataModule"]
