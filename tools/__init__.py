"""tools: the project's command line (convert, run, bench, meta-train, package, demo)."""
