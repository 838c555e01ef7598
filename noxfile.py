"""nox sessions: tests, lint, bench (reuse the torch wheel on disk: pip install torch==2.13.0 first)."""

import nox

nox.options.sessions = ["tests", "lint"]


def _install(session: nox.Session, extra: str = "test") -> None:
    session.install("torch==2.13.0")
    session.install("-e", f".[{extra}]")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-n", "2", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "vaedyn_cli", "tests", "bench", "tools")


@nox.session
def bench(session: nox.Session) -> None:
    _install(session)
    session.run("python", "bench/run_all.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def mutate(session: nox.Session) -> None:
    """Mutation testing of the modules that compute answers ([tool.mutmut] in pyproject.toml); not in CI:
    hours on 2 cores. Starts from the verdicts kept in docs/mutation-verdicts.json (a stopped session
    continues; changed functions run again), saves them back, and prints the survivors;
    docs/mutation.md records the last triage."""
    _install(session, "test,mutate")
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    session.run("python", "tools/mutation_verdicts.py", "restore")
    try:
        session.run("mutmut", "run", "--max-children", "2", *session.posargs, env=env)
    finally:
        session.run("python", "tools/mutation_verdicts.py", "save")
    session.run("mutmut", "results", env=env)
