"""Feature extractors: the registry (``registry``), the built-in extractors (``extractors``), the machinery they
share (``base``, ``keras``), preprocessing and weights files."""
