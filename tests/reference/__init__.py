"""Code this project did not write, vendored as references for parity tests (see each file's header)."""
