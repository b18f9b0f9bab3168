"""Typed settings read once from the environment and validated at start.

A bad or missing variable stops the process with one line naming it (`SettingsError`), instead of a
stack trace minutes later inside a request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imagetraining.formats import DEFAULT_EXTENSIONS


class SettingsError(Exception):
    """An environment variable is missing or malformed; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def _default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("imagetraining", appauthor=False))


@dataclass(frozen=True)
class Settings:
    library_roots: tuple[Path, ...]
    database_url: str | None = None
    data_dir: Path = field(default_factory=_default_data_dir)
    control_address: str = "127.0.0.1:50051"
    worker_address: str = "127.0.0.1:50052"
    # The address the control service dials to reach this worker (defaults to worker_address).
    worker_advertise_address: str | None = None
    log_level: str = "INFO"
    # "text" (readable lines) or "json" (one object per line: imagetraining.logs.JsonFormatter).
    log_format: str = "text"
    # Prometheus /metrics (imagetraining/metrics.py); None: not served.
    metrics_address: str | None = None
    # Limits of ScanDirectory / ValidateSession counting.
    scan_max_files: int = 200_000
    scan_max_seconds: float = 10.0
    # Worker.
    worker_id: str | None = None
    batch_size: int = 2000
    pool_size: int = 0  # 0: os.cpu_count()
    lease_seconds: float = 10.0
    heartbeat_seconds: float = 2.0
    poll_seconds: float = 2.0
    max_attempts: int = 5
    max_sessions_per_worker: int = 2
    # Train chunks of running sessions other workers own, with the capacity owned sessions leave.
    help_other_sessions: bool = True
    trainer: str = "discovery_worker.trainer:DefaultTrainer"
    # Images per trainer batch; 0: the trainer's own batch_size.
    train_batch_size: int = 0
    max_file_bytes: int = 100 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    # Streams.
    max_subscribers: int = 2000
    subscriber_idle_seconds: float = 30.0
    # Shutdown grace for in-flight RPCs.
    grace_seconds: float = 5.0
    # How long a starting process waits for PostgreSQL to accept connections before giving up.
    database_wait_seconds: float = 30.0
    # Optional bearer token required in `authorization` metadata (health and reflection stay open).
    auth_token: str | None = None
    # Optional TLS for both servers (PEM files); the control service uses the CA file to dial workers.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    default_extensions: tuple[str, ...] = DEFAULT_EXTENSIONS

    @property
    def advertised_worker_address(self) -> str:
        return self.worker_advertise_address or self.worker_address

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, library_roots: tuple[Path, ...] | None = None
    ) -> Settings:
        """Every variable parsed and checked, TLS files loaded once to prove they are usable.

        `library_roots` given: IMAGETRAINING_LIBRARY_ROOTS is not read (`make run` learns the data
        directory this way before it makes the demo library that will be the root).
        """
        env = os.environ if env is None else env
        p = _Parser(env)
        settings = cls(
            library_roots=p.roots("IMAGETRAINING_LIBRARY_ROOTS") if library_roots is None else library_roots,
            database_url=p.database_url("DATABASE_URL"),
            data_dir=p.path("IMAGETRAINING_DATA_DIR", _default_data_dir()),
            control_address=p.address("IMAGETRAINING_CONTROL_ADDRESS", "127.0.0.1:50051"),
            worker_address=p.address("IMAGETRAINING_WORKER_ADDRESS", "127.0.0.1:50052"),
            worker_advertise_address=p.optional_address("IMAGETRAINING_WORKER_ADVERTISE_ADDRESS"),
            log_level=p.choice("IMAGETRAINING_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_format=_log_format(p),
            metrics_address=p.optional_address("IMAGETRAINING_METRICS_ADDRESS"),
            scan_max_files=p.integer("IMAGETRAINING_SCAN_MAX_FILES", 200_000, 1, 10_000_000),
            scan_max_seconds=p.number("IMAGETRAINING_SCAN_MAX_SECONDS", 10.0, 0.1, 300.0),
            worker_id=env.get("IMAGETRAINING_WORKER_ID") or None,
            batch_size=p.integer("IMAGETRAINING_BATCH_SIZE", 2000, 100, 10_000),
            pool_size=p.integer("IMAGETRAINING_POOL_SIZE", 0, 0, 256),
            lease_seconds=p.number("IMAGETRAINING_LEASE_SECONDS", 10.0, 1.0, 3600.0),
            heartbeat_seconds=p.number("IMAGETRAINING_HEARTBEAT_SECONDS", 2.0, 0.1, 600.0),
            poll_seconds=p.number("IMAGETRAINING_POLL_SECONDS", 2.0, 0.05, 600.0),
            max_attempts=p.integer("IMAGETRAINING_MAX_ATTEMPTS", 5, 1, 1000),
            max_sessions_per_worker=p.integer("IMAGETRAINING_MAX_SESSIONS_PER_WORKER", 2, 1, 64),
            help_other_sessions=p.boolean("IMAGETRAINING_HELP_OTHER_SESSIONS", True),
            trainer=p.dotted("IMAGETRAINING_TRAINER", "discovery_worker.trainer:DefaultTrainer"),
            train_batch_size=p.integer("IMAGETRAINING_TRAIN_BATCH_SIZE", 0, 0, 256),
            max_file_bytes=p.integer("IMAGETRAINING_MAX_FILE_BYTES", 100 * 1024 * 1024, 1, 1 << 40),
            max_image_pixels=p.integer("IMAGETRAINING_MAX_IMAGE_PIXELS", 100_000_000, 1, 1 << 40),
            max_subscribers=p.integer("IMAGETRAINING_MAX_SUBSCRIBERS", 2000, 1, 1_000_000),
            subscriber_idle_seconds=p.number("IMAGETRAINING_SUBSCRIBER_IDLE_SECONDS", 30.0, 0.1, 3600.0),
            grace_seconds=p.number("IMAGETRAINING_GRACE_SECONDS", 5.0, 0.0, 600.0),
            database_wait_seconds=p.number("IMAGETRAINING_DATABASE_WAIT_SECONDS", 30.0, 0.0, 3600.0),
            auth_token=p.token("IMAGETRAINING_AUTH_TOKEN"),
            tls_cert_file=p.optional_file("IMAGETRAINING_TLS_CERT_FILE"),
            tls_key_file=p.optional_file("IMAGETRAINING_TLS_KEY_FILE"),
            tls_ca_file=p.optional_file("IMAGETRAINING_TLS_CA_FILE"),
        )
        check_tls_files(settings)
        return settings

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsError(
                "IMAGETRAINING_TLS_CERT_FILE",
                "set both IMAGETRAINING_TLS_CERT_FILE and IMAGETRAINING_TLS_KEY_FILE",
            )
        if self.database_url is None:
            # The embedded PostgreSQL keeps its files in the data directory: inside a library root
            # they would be walked, counted and served as a library (and change under the walk).
            data_dir = self.data_dir.expanduser().resolve()
            for root in self.library_roots:
                if data_dir == root or root in data_dir.parents:
                    raise SettingsError(
                        "IMAGETRAINING_LIBRARY_ROOTS",
                        f"{str(root)!r} contains IMAGETRAINING_DATA_DIR ({data_dir}), where the embedded "
                        "PostgreSQL keeps its files; choose directories that hold only the images, "
                        "or move IMAGETRAINING_DATA_DIR out of them",
                    )

    def validate_worker(self) -> None:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise SettingsError(
                "IMAGETRAINING_HEARTBEAT_SECONDS",
                f"must be shorter than IMAGETRAINING_LEASE_SECONDS ({self.lease_seconds})",
            )


class _Parser:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def roots(self, name: str) -> tuple[Path, ...]:
        raw = self._raw(name)
        if raw is None:
            raise SettingsError(name, "required: one or more library directories separated by " + repr(os.pathsep))
        roots: list[Path] = []
        for part in raw.split(os.pathsep):
            if not part.strip():
                continue
            path = Path(part.strip()).expanduser()
            if not path.is_absolute():
                raise SettingsError(name, f"{part!r} is not an absolute path")
            if not path.is_dir():
                raise SettingsError(name, f"{part!r} is not an existing directory")
            resolved = path.resolve()
            if resolved == Path(resolved.anchor):
                # The services would walk, count and expose every file of the machine.
                raise SettingsError(
                    name, f"{part!r} is the whole file system, not a library: name the directories that hold the images"
                )
            if resolved not in roots:
                roots.append(resolved)
        if not roots:
            raise SettingsError(name, "no directory given")
        return tuple(roots)

    def database_url(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is None:
            return None
        scheme = raw.split("://", 1)[0] if "://" in raw else ""
        if scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
            raise SettingsError(name, "must be a postgresql:// URL (e.g. postgresql://user@host:5432/db)")
        return raw

    def path(self, name: str, default: Path) -> Path:
        raw = self._raw(name)
        if raw is None:
            return default
        path = Path(raw).expanduser()
        if not path.is_absolute():
            raise SettingsError(name, f"{raw!r} is not an absolute path")
        return path

    def optional_file(self, name: str) -> Path | None:
        raw = self._raw(name)
        if raw is None:
            return None
        path = Path(raw).expanduser()
        if not path.is_file():
            raise SettingsError(name, f"{raw!r} is not a readable file")
        return path

    def token(self, name: str) -> str | None:
        """A bearer token, which must travel as gRPC metadata: visible ASCII (0x21-0x7E) only.

        gRPC refuses any other byte in an ASCII header value, so a token with a newline, a space or
        a non-ASCII character would be accepted here and then fail every client call with
        "Invalid metadata". The message never repeats the token.
        """
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return None  # blank means unset, as for every variable
        for index, char in enumerate(raw):
            if not 0x21 <= ord(char) <= 0x7E:
                raise SettingsError(
                    name,
                    f"character {index + 1} of the token is U+{ord(char):04X}, which cannot travel in gRPC "
                    "metadata: use visible ASCII characters only (0x21-0x7E, no spaces or line breaks)",
                )
        return raw

    def address(self, name: str, default: str) -> str:
        return self.optional_address(name) or default

    def optional_address(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is None:
            return None
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SettingsError(name, f"{raw!r} is not HOST:PORT")
        return raw

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.upper() not in allowed:
            raise SettingsError(name, f"{raw!r} is not one of {', '.join(allowed)}")
        return raw.upper()

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise SettingsError(name, f"{raw!r} is not true or false (1/0, yes/no, on/off)")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, f"{raw!r} is not an integer") from None
        if not low <= value <= high:
            raise SettingsError(name, f"{value} is not in {low}..{high}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(name, f"{raw!r} is not a number") from None
        if not low <= value <= high:
            raise SettingsError(name, f"{value} is not in {low}..{high}")
        return value

    def dotted(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        module, sep, attr = raw.partition(":")
        if not sep or not module or not attr:
            raise SettingsError(name, f"{raw!r} is not module.path:ClassName")
        return raw


def check_tls_files(settings: Settings) -> None:
    """Load the TLS files as the servers and the relay will, so a bad one is named at start.

    gRPC reports an unusable certificate as "Failed to bind to address", naming no file; the
    stdlib's OpenSSL parses the same PEM and says which one is wrong.
    """
    import ssl

    def fail(variable: str, path: Path, what: str, exc: Exception) -> SettingsError:
        text = str(exc).splitlines()[0] if str(exc) else ""
        reason = getattr(exc, "reason", None) or text or type(exc).__name__
        return SettingsError(variable, f"{str(path)!r} is not {what} ({reason})")

    def no_password() -> bytes:
        raise ValueError("the key is encrypted; give an unencrypted PEM key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if settings.tls_cert_file is not None:
        try:
            context.load_verify_locations(cafile=str(settings.tls_cert_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise fail("IMAGETRAINING_TLS_CERT_FILE", settings.tls_cert_file, "a PEM certificate", exc) from None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file), password=no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise fail(
                "IMAGETRAINING_TLS_KEY_FILE",
                settings.tls_key_file,
                "an unencrypted PEM private key of IMAGETRAINING_TLS_CERT_FILE's certificate",
                exc,
            ) from None
    if settings.tls_ca_file is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(settings.tls_ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise fail("IMAGETRAINING_TLS_CA_FILE", settings.tls_ca_file, "a PEM CA certificate", exc) from None


def _log_format(p: _Parser) -> str:
    """IMAGETRAINING_LOG_FORMAT: "text" or "json", in any case."""
    return p.choice("IMAGETRAINING_LOG_FORMAT", "TEXT", ("TEXT", "JSON")).lower()


def configure_logging(level: str, log_format: str | None = None) -> None:
    """One line per record on stderr; the migration and embedded-server libraries only when they warn.

    `log_format` "text" (readable) or "json" (one JSON object per line, imagetraining.logs.JsonFormatter);
    None: IMAGETRAINING_LOG_FORMAT of this process's environment, parsed as Settings.from_env does.
    Alembic and pgserver log a dozen INFO lines at every start, which drowned the lines that say
    what the services did. At DEBUG everything shows.
    """
    import logging
    import sys

    from imagetraining.logs import LOG_FORMATS, TEXT_FORMAT, JsonFormatter, RequestIdFilter

    if log_format is None:
        log_format = _log_format(_Parser(os.environ))
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    logging.basicConfig(level=level, format=TEXT_FORMAT, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
    if level != "DEBUG":
        for noisy in ("alembic", "pgserver"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
