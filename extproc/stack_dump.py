"""Stacks on demand, for a worker that serves but seems stuck: `kill -USR1 <pid>` writes every
thread's stack to stderr, `kill -USR2 <pid>` every asyncio task's.

Threads are dumped by faulthandler from C, so that works even when the event loop itself is
blocked; tasks can only be listed by the loop, which must be running to answer.
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys


def install_thread_dump() -> None:
    """SIGUSR1: all threads' Python stacks to stderr. Called first thing in a worker; SIGUSR2
    is ignored until the loop handles it, so an early request cannot kill the worker."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def install_task_dump(loop: asyncio.AbstractEventLoop) -> None:
    """SIGUSR2: every pending asyncio task's stack to stderr."""
    loop.add_signal_handler(signal.SIGUSR2, dump_tasks)


def dump_tasks() -> None:
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} asyncio tasks ---", file=sys.stderr)
    for task in tasks:
        print(f"{task.get_name()}: {task.get_coro()!r}", file=sys.stderr)
        # Not task.print_stack(): it fails on grpc's Cython frames, which have no line number.
        for frame in task.get_stack(limit=20):
            code = frame.f_code
            print(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}", file=sys.stderr)
    sys.stderr.flush()
