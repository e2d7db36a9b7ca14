"""The kernel ABI, in one place: syscalls, ioctls and struct layouts (ctypes).

Nothing here knows about asyncio or D-Bus. Every constant names the UAPI header
it comes from.
"""
