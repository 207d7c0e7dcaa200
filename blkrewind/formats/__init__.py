"""The floor: the formats both sides of the wire share.

record (the kernel's record layout), logframe (the LOG's frame codec, segment names and the
segment reader), wire (the tracer-server protocol), ranges (sets of frame numbers), pointname
(what a point's name may look like). Modules here import only the standard library,
third-party libraries and the other floor modules (blkrewind.errors, blkrewind.osutil); never
tracer, replayer, analytics or the CLI.
"""
