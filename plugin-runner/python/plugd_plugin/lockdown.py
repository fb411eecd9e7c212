"""Self-lockdown: once loaded, a plugin may not execve (when plugd asks, `sandbox.execve = false`).

plugd's own seccomp profile must let the interpreter's execve through (it is
applied before exec); this closes that door afterwards, for every thread, with
a small seccomp filter installed through ctypes. An execve then kills the
process with SIGSYS, which plugd reports as a sandbox violation.
"""

from __future__ import annotations

import ctypes
import os
import platform

_ARCHES = {
    # machine: (AUDIT_ARCH, seccomp syscall nr, execve, execveat, x32 bit or None)
    "x86_64": (0xC000003E, 317, 59, 322, 0x40000000),
    "aarch64": (0xC00000B7, 277, 221, 281, None),
}

_LD_ABS_W, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_ALLOW, _KILL_PROCESS = 0x7FFF0000, 0x80000000
_PR_SET_NO_NEW_PRIVS, _SET_MODE_FILTER, _FLAG_TSYNC = 38, 1, 1


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def _program(arch: int, execve: int, execveat: int, x32: int | None) -> list[_Insn]:
    # Every jump lands on the final KILL; offsets count from the next instruction.
    body: list[tuple[int, int, str | None]] = [(_LD_ABS_W, 4, None)]
    body.append((_JEQ_K, arch, "arch-ok"))
    body.append((_LD_ABS_W, 0, None))
    if x32 is not None:
        body.append((_JGE_K, x32, "kill-if"))
    body.append((_JEQ_K, execve, "kill-if"))
    body.append((_JEQ_K, execveat, "kill-if"))
    body.append((_RET_K, _ALLOW, None))
    body.append((_RET_K, _KILL_PROCESS, None))
    kill = len(body) - 1
    insns = []
    for i, (code, k, jump) in enumerate(body):
        jt = jf = 0
        if jump == "arch-ok":
            jf = kill - (i + 1)  # another architecture's syscall table: refuse
        elif jump == "kill-if":
            jt = kill - (i + 1)
        insns.append(_Insn(code, jt, jf, k))
    return insns


def apply_requested() -> list[str]:
    """Blocks execve for the whole process if PLUGD_LOCK_EXEC=1; returns the layers applied."""
    if os.environ.get("PLUGD_LOCK_EXEC") != "1":
        return []
    spec = _ARCHES.get(platform.machine())
    if spec is None:
        raise OSError("no-exec lockdown is not implemented for %s" % platform.machine())
    arch, sys_seccomp, execve, execveat, x32 = spec
    insns = _program(arch, execve, execveat, x32)
    array = (_Insn * len(insns))(*insns)
    prog = _Prog(len(insns), ctypes.cast(array, ctypes.POINTER(_Insn)))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    rc = libc.syscall(ctypes.c_long(sys_seccomp), ctypes.c_ulong(_SET_MODE_FILTER),
                      ctypes.c_ulong(_FLAG_TSYNC), ctypes.byref(prog))
    if rc != 0:
        raise OSError(ctypes.get_errno(), "seccomp(SET_MODE_FILTER, TSYNC) returned %d" % rc)
    return ["no-exec"]
