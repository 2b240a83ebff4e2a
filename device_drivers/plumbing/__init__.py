"""What drivers share: the byte-stream transport and port lookup (``transport``), the reader
thread's hand-off (``handoff``), the reopen loop (``link``) and composite devices (``composite``).
"""
