"""What a render is asked to do: the settings and their TOML config, the safe schedule evaluator, per-frame parameters and prompt files."""
