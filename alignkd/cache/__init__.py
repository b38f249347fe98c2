"""The offline teacher cache: ``alignkd cache-teacher`` writes it (``write``), a run reads it (``read``).

Submodules are imported where they are used: the writer needs the engine, and
the engine needs only the reader.
"""
