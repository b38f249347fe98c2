"""The teacher: one object for a live, sharded or cached teacher (``Teacher``), and the teacher cache's format and reader."""
