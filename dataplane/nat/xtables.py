"""The one module that runs iptables: the xt NFQUEUE rule, where nft has no `queue`.

Kernels built without CONFIG_NFT_QUEUE refuse nft's `queue` statement, but
the xt NFQUEUE target still works through iptables-nft. We own one chain,
DATAPLANE-QUEUE in the mangle table (priority -150: after our marking chain
at -160, before DNAT at -100), and one jump to it from PREROUTING and from
OUTPUT; nothing else in iptables is touched.

    -A DATAPLANE-QUEUE -m mark --mark 0x2000/0x2000 -j NFQUEUE --queue-balance 0:N-1 \
        --queue-cpu-fanout --queue-bypass

`--queue-bypass`: with no forwarder bound to the queue the packet goes on,
and meets the kernel's own pick (fail-open). `--queue-cpu-fanout` (xt_NFQUEUE
revision 3): queue = first + CPU % N, so a forwarder pinned to that CPU
decides the packet where it arrived; `install_probing()` falls back to the
address hash where the kernel or iptables refuses it. `install()` is
idempotent and replaces the chain's contents in one `iptables-restore
--noflush` batch; `remove()` is idempotent and never raises for what is
already gone.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, replace

from ..marks import QUEUE_BIT
from .userspace import QueueSpec

CHAIN = "DATAPLANE-QUEUE"
HOOKS = ("PREROUTING", "OUTPUT")
_COMMENT = "dataplane userspace mode"


class XtablesError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Xtables:
    """iptables (family 4) or ip6tables (6); `wrap` prefixes the argv (e.g. `ip netns exec NS` in tests)."""

    family: int = 4
    wrap: tuple[str, ...] = ()

    @property
    def _tool(self) -> str:
        return "iptables" if self.family == 4 else "ip6tables"

    def available(self) -> bool:
        return shutil.which(self._tool) is not None and shutil.which(f"{self._tool}-restore") is not None

    def script(self, queue: QueueSpec) -> str:
        """The iptables-restore text that installs our chain (with --noflush: nothing else changes)."""
        target = f"--queue-num {queue.first}" if queue.count == 1 else f"--queue-balance {queue.first}:{queue.last}"
        if queue.fanout and queue.count > 1:
            target += " --queue-cpu-fanout"
        lines = [
            "*mangle",
            f":{CHAIN} - [0:0]",
            f"-F {CHAIN}",
            f"-A {CHAIN} -m mark --mark 0x{QUEUE_BIT:x}/0x{QUEUE_BIT:x} -j NFQUEUE {target} --queue-bypass",
            "COMMIT",
        ]
        return "\n".join(lines) + "\n"

    def install(self, queue: QueueSpec) -> None:
        """Installs or refreshes the queue rule; raises XtablesError with iptables' message."""
        self._run([f"{self._tool}-restore", "--noflush", "-w"], self.script(queue))
        for hook in HOOKS:
            if self._jump("-C", hook, check=False) != 0:
                self._jump("-I", hook)

    def install_probing(self, queue: QueueSpec) -> QueueSpec:
        """install(queue); when CPU fanout is asked for and refused, install without it. Returns what was installed.

        The refused batch changed nothing (iptables-restore is atomic), so the
        second try starts from the same state. Raises XtablesError when both fail.
        """
        try:
            self.install(queue)
            return queue
        except XtablesError:
            if not (queue.fanout and queue.count > 1):
                raise
        hashed = replace(queue, fanout=False)
        self.install(hashed)
        return hashed

    def installed(self) -> bool:
        return self._run([self._tool, "-w", "-t", "mangle", "-S", CHAIN], check=False) == 0

    def remove(self) -> None:
        """Removes the jumps and the chain; idempotent."""
        if not self.available() or not self.installed():
            return  # (and never creates iptables' mangle table just to look)
        for hook in HOOKS:
            while self._jump("-D", hook, check=False) == 0:
                pass
        self._run([self._tool, "-w", "-t", "mangle", "-F", CHAIN], check=False)
        self._run([self._tool, "-w", "-t", "mangle", "-X", CHAIN], check=False)

    def _jump(self, verb: str, hook: str, check: bool = True) -> int:
        return self._run([self._tool, "-w", "-t", "mangle", verb, hook, "-m", "comment", "--comment", _COMMENT,
                          "-j", CHAIN], check=check)

    def _run(self, argv: list[str], text: str | None = None, check: bool = True) -> int:
        done = subprocess.run([*self.wrap, *argv], input=text, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise XtablesError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
        return done.returncode
