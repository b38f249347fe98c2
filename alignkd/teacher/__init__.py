"""The teacher: one object for a live, sharded or cached teacher (``Teacher``), and the teacher cache's format and
reader.

The cache is written by ``alignkd cache-teacher`` (``alignkd.engine.cache_teacher``).
"""

from alignkd.teacher.cached import TeacherCache
from alignkd.teacher.teacher import Teacher

__all__ = ["Teacher", "TeacherCache"]
