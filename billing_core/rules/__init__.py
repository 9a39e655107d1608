"""The pure rules: resources and periods, window arithmetic, limit evaluation, token pricing,
wallet allocation and plain-language explanations. Values in, values out; no I/O."""
