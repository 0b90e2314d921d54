"""Three (or more) "hosts" on one machine, made from Linux network namespaces.

    with netns.hosts(3) as net:
        net.hosts[0].name, net.hosts[0].addr     # "trpc1234_0", "10.77.0.1"
        net.exec_argv(0, [sys.executable, ...])  # argv that runs inside host 0
        net.cut(2); net.restore(2)               # pull / replug host 2's cable
        net.impair(1, delay_ms=30, loss_pct=5)   # both directions of host 1's link

Layout: one namespace per host plus a "switch" namespace holding a bridge;
each host has a veth pair, `eth0` inside the host (ADDR/24, lo up) and
`vK` on the bridge in the switch. Putting the bridge in its own namespace
keeps the machine's own firewall (br_netfilter, FORWARD policies) and
interfaces out of the way, and lets `cut` down a switch port like a pulled
cable: the host keeps its address and its sockets, and packets to and
from it are dropped silently (no RST, no ICMP). `impair` uses tc netem, or,
on kernels built without it, a userspace wire (two TAP devices and a
thread per direction in this process) that delays and drops frames.

Names carry the creating pid (`trpc<pid>_<k>`, `trpc<pid>_sw`) so parallel
runs never collide; namespaces left by a run that was SIGKILLed (its pid is
gone) are removed the next time. Everything is torn down on exit, also
when the body or the set-up raises. Needs root (CAP_NET_ADMIN and
CAP_SYS_ADMIN); `NetnsUnavailable` says why when they are missing.
"""

import collections
import contextlib
import dataclasses
import fcntl
import os
import random
import re
import select
import shutil
import struct
import subprocess
import threading
import time
from typing import List

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
PREFIX = "trpc"
_OURS = re.compile(rf"^{PREFIX}(\d+)_(\w+)$")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no CAP_NET_ADMIN, no iproute2)."""


@dataclasses.dataclass
class Host:
    index: int
    name: str  # namespace name
    addr: str  # IPv4 address of its eth0
    port: str  # its switch port (interface name in the switch namespace)


def _run(*argv, check=True):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, argv, p.stdout, p.stderr)
    return p


def _list_namespaces() -> List[str]:
    p = _run(IP, "netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(min_age_s: float = 600.0):
    """Deletes namespaces of ours whose creating process no longer exists
    (and that are older than min_age_s, in case that pid lives in another
    pid namespace that shares /run/netns)."""
    for ns in _list_namespaces():
        m = _OURS.match(ns)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            age = time.time() - os.stat(f"/run/netns/{ns}").st_mtime
        except OSError:
            continue
        if age > min_age_s:
            _run(IP, "netns", "del", ns, check=False)


class Net:
    def __init__(self, n: int, subnet: str):
        pid = os.getpid()
        self.switch = f"{PREFIX}{pid}_sw"
        self.hosts = [
            Host(k, f"{PREFIX}{pid}_{k}", f"{subnet}.{k + 1}", f"v{k}") for k in range(n)
        ]
        self.created: List[str] = []
        self.wires = {}  # host index -> _Wire
        self._netem = None

    # -- set-up and teardown ------------------------------------------------

    def _add_ns(self, name):
        p = _run(IP, "netns", "add", name, check=False)
        if p.returncode != 0:
            raise NetnsUnavailable(
                f"`ip netns add {name}` failed (rc {p.returncode}): {p.stderr.strip()}"
            )
        self.created.append(name)

    def setup(self):
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (euid is %d)" % os.geteuid())
        if not os.access(IP, os.X_OK):
            raise NetnsUnavailable(f"iproute2's `ip` not found (looked for {IP})")
        remove_stale()
        self._add_ns(self.switch)
        try:
            self._build()
        except subprocess.CalledProcessError as e:
            # No veth or bridge support (or a sandbox that forbids them).
            raise NetnsUnavailable(
                f"`{' '.join(e.cmd)}` failed (rc {e.returncode}): {e.stderr.strip()}"
            ) from e
        return self

    def _build(self):
        sw = self.switch
        _run(IP, "-n", sw, "link", "set", "lo", "up")
        _run(IP, "-n", sw, "link", "add", "br0", "type", "bridge")
        _run(IP, "-n", sw, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_ns(h.name)
            _run(IP, "-n", h.name, "link", "set", "lo", "up")
            # Both ends made from inside the switch: no name ever lives in the
            # root namespace, so parallel runs cannot clash on interface names.
            _run(IP, "-n", sw, "link", "add", h.port, "type", "veth",
                 "peer", "name", "eth0", "netns", h.name)
            _run(IP, "-n", sw, "link", "set", h.port, "master", "br0")
            _run(IP, "-n", sw, "link", "set", h.port, "up")
            _run(IP, "-n", h.name, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _run(IP, "-n", h.name, "link", "set", "eth0", "up")

    def teardown(self):
        for wire in self.wires.values():
            wire.close()
        self.wires.clear()
        errors = []
        for name in reversed(self.created):
            p = _run(IP, "netns", "del", name, check=False)
            if p.returncode != 0 and name in _list_namespaces():
                errors.append(f"{name}: {p.stderr.strip()}")
        self.created.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))

    # -- use ----------------------------------------------------------------

    def exec_argv(self, k: int, argv: List[str]) -> List[str]:
        """argv that runs `argv` inside host k (ip netns exec execs it: same pid)."""
        return [IP, "netns", "exec", self.hosts[k].name, *argv]

    def cut(self, k: int):
        """Pulls host k's cable: its switch port goes down, traffic is dropped."""
        _run(IP, "-n", self.switch, "link", "set", self.hosts[k].port, "down")

    def restore(self, k: int):
        """Plugs host k back in and removes any netem on its link."""
        h = self.hosts[k]
        _run(IP, "-n", self.switch, "link", "set", h.port, "up")
        _run(TC, "-n", self.switch, "qdisc", "del", "dev", h.port, "root", check=False)
        _run(TC, "-n", h.name, "qdisc", "del", "dev", "eth0", "root", check=False)
        if k in self.wires:
            self.wires[k].delay_s = self.wires[k].loss = 0.0

    def restore_all(self):
        for k in range(len(self.hosts)):
            self.restore(k)

    def netem(self, k: int, spec: str):
        """Adds `tc qdisc ... root netem SPEC` to both directions of host k's link."""
        args = spec.split()
        _run(TC, "-n", self.switch, "qdisc", "replace", "dev", self.hosts[k].port,
             "root", "netem", *args)
        _run(TC, "-n", self.hosts[k].name, "qdisc", "replace", "dev", "eth0",
             "root", "netem", *args)

    def netem_available(self) -> bool:
        """Whether this kernel has the netem qdisc (many VM kernels lack it)."""
        if self._netem is None and not os.access(TC, os.X_OK):
            self._netem = False
        if self._netem is None:
            p = _run(TC, "-n", self.switch, "qdisc", "add", "dev", "lo", "root", "netem",
                     "delay", "1ms", check=False)
            self._netem = p.returncode == 0
            _run(TC, "-n", self.switch, "qdisc", "del", "dev", "lo", "root", check=False)
        return self._netem

    def prepare_impairment(self, k: int):
        """Where impair() will need a userspace wire, puts host k's link on one
        now, unimpaired. Swapping links takes the host off the network for a
        moment (longer than peer_timeout on a loaded machine), so a test does
        it before its workers connect, not while they talk."""
        if not self.netem_available() and k not in self.wires:
            self._wire(k)

    def impair(self, k: int, delay_ms: float, loss_pct: float) -> str:
        """Delays each packet on host k's link by delay_ms and drops loss_pct %
        of them, both directions. Uses tc netem when the kernel has it, else
        moves the link onto a userspace wire (_Wire) that does the same.
        Returns which ("tc netem" or "userspace wire")."""
        if self.netem_available():
            self.netem(k, f"delay {delay_ms}ms loss {loss_pct}%")
            return "tc netem"
        wire = self.wires.get(k) or self._wire(k)
        wire.delay_s, wire.loss = delay_ms / 1000.0, loss_pct / 100.0
        return "userspace wire"

    def _wire(self, k: int) -> "_Wire":
        """Replaces host k's veth pair by two TAP devices joined by a _Wire.
        The host's eth0 keeps its MAC and address, so neighbours' ARP
        entries and open TCP connections carry on (after a retransmit)."""
        h, sw = self.hosts[k], self.switch
        mac = _run(IP, "-n", h.name, "-br", "link", "show", "eth0").stdout.split()[2]
        pid = os.getpid()
        a, b = f"tw{pid}{k}a", f"tw{pid}{k}b"  # root-namespace names while created
        fds = [_open_tap(a), _open_tap(b)]
        try:
            _run(IP, "link", "set", a, "netns", h.name)
            _run(IP, "link", "set", b, "netns", sw)
            _run(IP, "-n", sw, "link", "del", h.port)  # takes eth0 with it
            _run(IP, "-n", h.name, "link", "set", a, "name", "eth0", "address", mac)
            _run(IP, "-n", h.name, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _run(IP, "-n", h.name, "link", "set", "eth0", "up")
            _run(IP, "-n", sw, "link", "set", b, "name", h.port, "master", "br0", "up")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        wire = self.wires[k] = _Wire(fds[0], fds[1])
        return wire


@contextlib.contextmanager
def hosts(n: int = 3, subnet: str = "10.77.0"):
    """A Net of n hosts at SUBNET.1 .. SUBNET.n; always torn down."""
    net = Net(n, subnet)
    try:
        net.setup()
        yield net
    finally:
        net.teardown()


# -- a userspace wire, for kernels without netem ---------------------------------

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def _open_tap(name: str) -> int:
    """A TAP device called `name` (in this process's namespace); its fd."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        raise NetnsUnavailable(f"cannot open /dev/net/tun for a userspace wire: {e}") from e
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Wire:
    """Copies Ethernet frames between two TAP fds, one thread per direction,
    delaying each by `delay_s` and dropping a `loss` fraction of them at
    random (what netem's "delay D loss L%" does on both ends of a link).
    Frames leave in arrival order. Runs in the test process."""

    def __init__(self, fd_a: int, fd_b: int):
        self.fds = (fd_a, fd_b)
        self.delay_s = 0.0
        self.loss = 0.0
        self.stats = {"forwarded": 0, "dropped": 0}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._pump, args=(fd_a, fd_b), daemon=True),
            threading.Thread(target=self._pump, args=(fd_b, fd_a), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, src: int, dst: int):
        queue = collections.deque()  # (due, frame): constant delay keeps it sorted
        while not self._stop.is_set():
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                frame = queue.popleft()[1]
                try:
                    os.write(dst, frame)
                    self.stats["forwarded"] += 1
                except OSError:
                    pass  # the other side is down (a cut link): the frame is lost
            wait = min(0.05, queue[0][0] - now) if queue else 0.05
            try:
                ready, _, _ = select.select([src], [], [], max(0.0, wait))
                if not ready:
                    continue
                frame = os.read(src, 65536)
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.01)
                continue
            if self.loss and random.random() < self.loss:
                self.stats["dropped"] += 1
                continue
            queue.append((time.monotonic() + self.delay_s, frame))

    def close(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
