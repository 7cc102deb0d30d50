"""The web client of the download stage: addresses, headers, deadlines, the fetcher, robots.txt, per-host limits."""
