"""The persistence filter: a per-channel debounce of inactive (dormant or dead) vs active, carried
across chunks of tracked steps (definitions: `vaedyn_cli/classification.py`, "Persistence filter")."""

from __future__ import annotations

import numpy as np

from vaedyn_cli.labels import ACTIVE, DEAD, DORMANT, NO_STEP, UNKNOWN, UNOBSERVED


def _last_of_group(keys: np.ndarray) -> np.ndarray:
    """Mask of the last element of each run of equal keys (keys sorted by group)."""
    out = np.ones(len(keys), bool)
    out[:-1] = keys[1:] != keys[:-1]
    return out


def _first_of_group(keys: np.ndarray) -> np.ndarray:
    out = np.ones(len(keys), bool)
    out[1:] = keys[1:] != keys[:-1]
    return out


class Debounce:
    """Per-channel persistence filter over inactive/active, carried across chunks of steps.

    Per chunk, channels whose raw code does not change ("quiet", the common case) are updated in
    bulk; the others are cut into runs of equal state (vectorised over all their runs): a run of
    at least `min_persist` observed steps sets the filtered state, and counts as a change when
    its state differs from that of the previous such run.
    """

    _FIELDS = ("seen", "initial", "cur", "run", "run_len", "run_start", "n_trans", "onset", "revival",
               "last_dead", "last_code")
    BATCH = 1 << 21  # (steps x channels) processed at once on the run path: bounds its memory

    def __init__(self, n: int, min_persist: int) -> None:
        self.k = min_persist
        self.seen = np.zeros(n, bool)
        self.initial = np.zeros(n, bool)  # inactive at the first observed step
        self.cur = np.zeros(n, bool)  # filtered state: inactive?
        self.run = np.zeros(n, bool)  # raw state of the current run: inactive?
        self.run_len = np.zeros(n, np.int64)  # observed steps in the current run
        self.run_start = np.full(n, NO_STEP, np.int64)  # step where the current run began
        self.n_trans = np.zeros(n, np.int64)
        self.onset = np.full(n, NO_STEP, np.int64)
        self.revival = np.full(n, NO_STEP, np.int64)
        self.last_dead = np.zeros(n, bool)  # the most recent inactive observed step was dead
        self.last_code = np.full(n, UNOBSERVED, np.int8)  # raw code of the most recent observed step

    def update(self, steps: np.ndarray, codes: np.ndarray) -> None:
        """A chunk of tracked steps: raw codes of shape (len(steps), channels)."""
        steps = np.asarray(steps, np.int64)
        ref = np.where(self.seen, self.last_code, codes[0])
        same = (codes == ref).all(axis=0)
        held = same & (ref >= ACTIVE)  # observed at every step with an unchanged code
        new = held & ~self.seen
        if new.any():
            inact = ref[new] >= DORMANT
            self.seen[new] = True
            self.initial[new] = self.cur[new] = self.run[new] = inact
            self.run_len[new] = 0
            self.run_start[new] = steps[0]
            self.last_code[new] = ref[new]
            self.last_dead[new] = ref[new] == DEAD
        self.run_len[held] += len(steps)
        change = held & (self.run != self.cur) & (self.run_len >= self.k)
        if change.any():
            self.cur[change] = self.run[change]
            self.n_trans += change
            self.onset[change & self.cur] = self.run_start[change & self.cur]
            self.revival[change & ~self.cur] = self.run_start[change & ~self.cur]
        other = np.flatnonzero(~same)
        if other.size:
            busy = other[~(codes[:, other] == UNOBSERVED).all(axis=0)]
            per = max(1, self.BATCH // len(steps))
            for a in range(0, len(busy), per):
                cols = busy[a:a + per]
                self._runs(cols, steps, codes[:, cols])

    def _runs(self, cols: np.ndarray, steps: np.ndarray, codes: np.ndarray) -> None:
        """Update channels `cols` (each observed at least once in the chunk) run by run."""
        n_steps, n_cols = codes.shape
        flat = np.ascontiguousarray(codes.T).ravel()  # channel-major: each channel's steps in order
        idx = np.flatnonzero(flat >= ACTIVE)
        code = flat[idx]
        c, t = np.divmod(idx, n_steps)
        x = code >= DORMANT
        # runs of equal state within each channel
        rs = np.flatnonzero(_first_of_group(c) | _first_of_group(x))
        rc, rx = c[rs], x[rs]
        rlen = np.diff(np.append(rs, len(idx)))
        rstart = steps[t[rs]]
        seen, run = self.seen[cols], self.run[cols]
        col_first = _first_of_group(rc)
        cont = col_first & seen[rc] & (rx == run[rc])  # the chunk's first run continues the carried one
        rlen = rlen + np.where(cont, self.run_len[cols][rc], 0)
        rstart = np.where(cont, self.run_start[cols][rc], rstart)
        first_x = rx[col_first]  # one entry per channel: every channel has an observed step
        initial = np.where(seen, self.initial[cols], first_x)
        cur = np.where(seen, self.cur[cols], first_x)
        # persistent runs and the changes between them
        p = np.flatnonzero(rlen >= self.k)
        pc, px = rc[p], rx[p]
        prev = np.empty_like(px)
        prev[1:] = px[:-1]
        pfirst = _first_of_group(pc)
        prev[pfirst] = cur[pc[pfirst]]
        change = px != prev
        n_trans = self.n_trans[cols] + np.bincount(pc[change], minlength=n_cols)
        onset, revival = self.onset[cols], self.revival[cols]
        for target, which in ((onset, change & px), (revival, change & ~px)):
            r = p[which]
            last = _last_of_group(rc[r])
            target[rc[r][last]] = rstart[r][last]
        plast = _last_of_group(pc)
        cur[pc[plast]] = px[plast]
        # carried state for the next chunk
        rl = _last_of_group(rc)
        run[rc[rl]] = rx[rl]
        run_len, run_start = self.run_len[cols], self.run_start[cols]
        run_len[rc[rl]] = rlen[rl]
        run_start[rc[rl]] = rstart[rl]
        last_code = self.last_code[cols]
        el = _last_of_group(c)
        last_code[c[el]] = code[el]
        last_dead = self.last_dead[cols]
        ix = np.flatnonzero(x)
        if ix.size:
            il = ix[_last_of_group(c[ix])]
            last_dead[c[il]] = code[il] == DEAD
        self.seen[cols] = True
        self.initial[cols], self.cur[cols], self.run[cols] = initial, cur, run
        self.run_len[cols], self.run_start[cols], self.n_trans[cols] = run_len, run_start, n_trans
        self.onset[cols], self.revival[cols] = onset, revival
        self.last_code[cols], self.last_dead[cols] = last_code, last_dead

    def states(self) -> np.ndarray:
        out = np.where(self.cur, np.where(self.last_dead, "dead", "dormant"), "active").astype(object)
        out[~self.seen] = UNKNOWN
        return out

    def trajectories(self) -> np.ndarray:
        out = np.full(len(self.cur), "intermittent", dtype=object)
        out[(self.n_trans == 0) & ~self.initial] = "active"
        out[(self.n_trans == 0) & self.initial] = "born_dormant"
        out[(self.n_trans == 1) & ~self.initial] = "died"
        out[(self.n_trans == 1) & self.initial] = "revived"
        out[~self.seen] = UNKNOWN
        return out

