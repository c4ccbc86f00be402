"""The review of a night's identify output: the sheet contract shared with ``gallery merge``
(``sheet.py``), the decisions and their files (``state.py``), the local page (``server.py``,
``page.py``, ``images.py``) and ``reid-ray review`` (``commands.py``)."""
