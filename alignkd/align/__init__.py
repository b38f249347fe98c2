"""Where the two models meet: tasks, layer maps and projectors, the term plan, loss weighting, block scores.

- :mod:`~alignkd.align.tasks`: causal LM, masked LM, classification (data, batches, counted positions).
- :mod:`~alignkd.align.maps`: which student block meets which teacher block; projectors and mixtures.
- :mod:`~alignkd.align.plan`: the configured terms resolved against the models (``StudentSide``).
- :mod:`~alignkd.align.weighting`: how the terms' values are weighted into one loss.
- :mod:`~alignkd.align.blocks`: scoring the teacher's blocks to choose a shallower student's.

It sits above ``models``, ``data`` and ``terms`` and below ``config``.
"""
