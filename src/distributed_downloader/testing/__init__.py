"""Tools for testing the downloader, not part of it: `farm` serves images from loopback
addresses with the faults real servers have (rate limits, 5xx, slow and truncated answers,
resets, redirects). The tests, the benchmarks and the bundled example use it."""
