"""DeepSpeed/MPI-style hostfiles and the ``--include``/``--exclude`` node filters, as pure functions.

The DeepSpeed runner parses these too, but only after importing torch, sometimes after an ssh round
trip, and its errors print the whole file. Checking here first gives one line that names the file, the
line and the fix, and lets ``ramp-launch`` and the torchrun path share the same reading of a hostfile.
Semantics follow ``deepspeed.launcher.runner`` (0.19): hosts keep file order, and that order is the node
rank, so ``--node_rank i`` on a machine means "I am the i-th host of the (filtered) file".
"""

from __future__ import annotations

import re

from launcher.errors import RampError, require

# ``HOST slots=N``, optionally OpenMPI's ``max_slots=M``, optionally a trailing comment.
_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S*)(?:\s+max_slots=\d+)?\s*(?:#.*)?$")
_HOST = re.compile(r"^[A-Za-z0-9_.\-\[\]]+$")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """Read ``HOST slots=N`` lines (``#`` comments and blank lines allowed) into {host: slots}, in order."""
    pool: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        require(
            m is not None,
            f"{source}:{lineno}: {line!r} is not 'HOST slots=N' (one node per line, e.g. 'worker-0 slots=8')",
        )
        host, slots = m["host"], m["slots"]
        require(
            _HOST.match(host) is not None,
            f"{source}:{lineno}: host name {host!r} has characters that the --include/--exclude syntax "
            "(NAME[:SLOTS]@...) cannot carry; use its hostname or IPv4 address",
        )
        require(
            slots.isdigit() and int(slots) > 0,
            f"{source}:{lineno}: slots={slots!r} for {host}: give the number of processes (> 0)",
        )
        require(
            host not in pool,
            f"{source}:{lineno}: host {host!r} is already listed at line {first_seen.get(host)}; "
            "list each node once with all its slots",
        )
        pool[host] = int(slots)
        first_seen[host] = lineno
    require(bool(pool), f"{source}: no hosts in it; write one 'HOST slots=N' line per node")
    return pool


def read_hostfile(path: str) -> dict[str, int]:
    """Parse the hostfile at ``path``; a missing file is a one-line error, not DeepSpeed's silent fallback."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise RampError(f"hostfile {path}: no such file") from None
    except OSError as e:
        raise RampError(f"hostfile {path}: cannot read it ({e.strerror})") from None
    return parse_hostfile(text, source=path)


def parse_node_spec(spec: str, flag: str = "--include") -> dict[str, list[int]]:
    """Parse ``NAME[:SLOT[,SLOT...]][@NAME...]`` into {host: sorted slots}; [] means all its slots."""
    nodes: dict[str, list[int]] = {}
    for part in spec.split("@"):
        require(
            bool(part.strip()),
            f"{flag} {spec!r}: empty node between '@'; write NAME[:SLOT,...]@NAME[:SLOT,...]",
        )
        name, sep, slot_text = part.strip().partition(":")
        require(bool(name), f"{flag} {spec!r}: {part!r} has no host name before ':'")
        slots: list[int] = []
        if sep:
            for s in slot_text.split(","):
                require(
                    s.strip().isdigit(),
                    f"{flag} {spec!r}: slot {s!r} of {name} is not a non-negative integer",
                )
                slots.append(int(s))
            require(bool(slots), f"{flag} {spec!r}: {name}: list slots after ':' or drop the ':'")
        # A bare name anywhere in the spec means the whole host; otherwise the slot lists merge.
        whole = not slots or (name in nodes and not nodes[name])
        nodes[name] = [] if whole else sorted(set(nodes.get(name, []) + slots))
    return nodes


def select_resources(
    pool: dict[str, int],
    include: str = "",
    exclude: str = "",
    num_nodes: int | None = None,
    slots_per_node: int | None = None,
) -> dict[str, list[int]]:
    """Apply the filters to a parsed hostfile: {host: slot ids used}, in hostfile order.

    ``num_nodes`` keeps the first N hosts and ``slots_per_node`` uses slots [0, N) of each, as DeepSpeed's
    ``--num_nodes``/``--num_gpus`` do; like DeepSpeed, neither combines with ``--include``/``--exclude``.
    """
    require(not (include and exclude), "give --include or --exclude, not both")
    require(
        not ((include or exclude) and (num_nodes is not None or slots_per_node is not None)),
        "--include/--exclude pick the slots themselves: drop --nproc/--num-nodes, or drop the filter",
    )
    resources = {host: list(range(n)) for host, n in pool.items()}
    for flag, spec in (("--include", include), ("--exclude", exclude)):
        if not spec:
            continue
        nodes = parse_node_spec(spec, flag)
        for host, slots in nodes.items():
            require(host in pool, f"{flag}: host {host!r} is not in the hostfile ({', '.join(pool)})")
            bad = [s for s in slots if s >= pool[host]]
            if bad:
                raise RampError(
                    f"{flag}: {host} has slots 0..{pool[host] - 1} in the hostfile; no slot {bad[0]}"
                )
        if flag == "--include":
            resources = {h: (nodes[h] or resources[h]) for h in pool if h in nodes}
        else:
            kept: dict[str, list[int]] = {}
            for h, r in resources.items():
                if h not in nodes:
                    kept[h] = r
                elif nodes[h]:  # only some slots go; a bare name ([]) drops the whole host
                    kept[h] = [s for s in r if s not in nodes[h]]
            resources = {h: r for h, r in kept.items() if r}
            require(bool(resources), f"--exclude {spec!r} leaves no slot to run on")
    if num_nodes is not None:
        require(
            1 <= num_nodes <= len(resources),
            f"num_nodes={num_nodes}: the hostfile has {len(resources)} node(s)",
        )
        resources = dict(list(resources.items())[:num_nodes])
    if slots_per_node is not None:
        require(slots_per_node >= 1, f"--nproc {slots_per_node}: must be >= 1")
        short = [h for h in resources if pool[h] < slots_per_node]
        if short:
            raise RampError(
                f"--nproc {slots_per_node}: {short[0]} has only {pool[short[0]]} slot(s) in the hostfile; "
                "lower --nproc or raise its slots"
            )
        resources = {h: list(range(slots_per_node)) for h in resources}
    return resources


def is_local_host(name: str) -> bool:
    """Whether a hostfile name is this machine by definition (no ssh needed to reach it)."""
    return name in LOCAL_HOSTS or name.startswith("127.")
