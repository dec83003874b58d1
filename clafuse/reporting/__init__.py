"""Reports on alignments and fusions: the mapping in words, transport statistics, figures and a
self-contained HTML page (``clafuse report``)."""
