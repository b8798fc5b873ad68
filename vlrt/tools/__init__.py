"""Commands around a render: benchmarks, the flicker report, the environment doctor."""
