"""`vlrt ui`: the extension's panel in a browser; renders and previews run as `vlrt` child processes."""
