"""Sans-I/O protocol cores: bytes (or records) in, typed frames out, and back.

Nothing here opens a port, a card reader, a camera or a socket, and nothing imports pyserial,
pyscard, OpenCV or pymodbus (``tests/unit/test_codecs_sans_io.py`` checks): the driver modules
one level up wrap these with the real I/O.
"""
