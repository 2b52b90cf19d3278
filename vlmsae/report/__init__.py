"""Reports built from the jobs' outputs: the static feature browser (:mod:`vlmsae.report.browser`)."""
