"""The session's state machine: every statement that changes a session's state, lease or counters.

Both services import this module and nothing else writes `training_sessions` (tests import these
statements too, instead of copying them), so one file answers "who may move a session from A to B,
and what else changes with it". The rules the statements share:

- A state change is one guarded UPDATE (`WHERE id = :id AND state = ANY(...)`): zero rows means
  another writer moved the session first, and PostgreSQL's row lock decides which of two concurrent
  calls wins. `ALLOWED` is the whole graph; a unit test checks every statement against it.
- A state change subscribers hear about raises `event_sequence` by one (`ANNOUNCE`): the stream's
  message for it is numbered above anything an owner sent before. A claim reserves a whole block
  (`SEQUENCE_BLOCK`) for the stream its owner will serve.
- A worker's write is fenced (`OWNED`): it matches only while the worker's claim (`epoch`, `owner_id`)
  is current, so a worker whose lease lapsed writes nothing. Lease times use the database clock.
- Counters move in the same statement as the job rows they count, so they can never disagree.
- A transition NOTIFYs `imagetraining_sessions` in the same transaction
  (`imagetraining.notifications.notify`): a wake-up for workers and relays, never a source of truth.

The statements are SQLAlchemy `text()` with named parameters; the callers bind and execute them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import TextClause, text

from imagetraining.states import ACTIVE_STATES, SessionState
from imagetraining.tracing import traceparent

S = SessionState

# Sequence numbers a claim reserves for its owner's event stream (discovery_worker.events).
SEQUENCE_BLOCK = 100_000

# ---- the graph ---------------------------------------------------------------------------------------

# Every state change any statement below can make, and who makes it.
ALLOWED: dict[SessionState, frozenset[SessionState]] = {
    S.PENDING: frozenset({S.DISCOVERING, S.CANCELLED}),  # StartSession, CancelSession
    # The worker: all images recorded / no image found or crashed too often; clients: pause, cancel;
    # the worker again: its library went offline (paused).
    S.DISCOVERING: frozenset({S.RUNNING, S.FAILED, S.PAUSED, S.CANCELLED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.PAUSED, S.CANCELLED}),
    S.PAUSED: frozenset({S.DISCOVERING, S.RUNNING, S.CANCELLED}),  # ResumeSession, CancelSession
    # RestartSession (and StartSession again after a failure).
    S.COMPLETED: frozenset({S.DISCOVERING, S.RUNNING}),
    S.CANCELLED: frozenset({S.DISCOVERING, S.RUNNING}),
    S.FAILED: frozenset({S.DISCOVERING, S.RUNNING}),
}

# ---- fragments, written once -------------------------------------------------------------------------

# A change subscribers are told about: a new sequence number above everything sent so far.
ANNOUNCE = "update_time = now(), event_sequence = event_sequence + 1"
# No worker holds the session (a finished, paused or handed-back run).
DISOWN = "owner_id = NULL, owner_address = NULL, lease_expires_at = NULL"
# The fence: this worker's claim is still the current one.
OWNED = "id = :id AND epoch = :epoch AND owner_id = :owner"
# A session a worker may claim: active, and nobody's lease is running.
CLAIMABLE = "state IN ('discovering', 'running') AND (owner_id IS NULL OR lease_expires_at < now())"
# A run needs at least one selected subdirectory.
# The session's trainer is the caller's (:trainer_name, :trainer_version, :model_digest).
SAME_TRAINER = "trainer_name = :trainer_name AND trainer_version = :trainer_version AND model_digest = :model_digest"
HAS_SELECTION = "EXISTS (SELECT 1 FROM session_subdirectories WHERE session_id = :id AND selected)"
# Columns a new run starts from (StartSession, RestartSession).
RESET_RUN = f"start_time = now(), end_time = NULL, state_reason = '', resume_state = NULL, attempts = 0, {DISOWN}"
RESET_DISCOVERY = """total_final = false, directories_scanned = 0, files_seen = 0, images_found = 0,
    assets_new = 0, assets_changed = 0, assets_unchanged = 0, unreadable_paths = 0,
    current_directory = '', discovery_checkpoint = NULL,
    discovery_started_at = NULL, discovery_finished_at = NULL"""


# ---- client transitions (control service) ------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    """A client's state change: the call, the states it applies in, what it sets, where it can lead."""

    call: str
    source: tuple[SessionState, ...]
    assignments: str
    targets: tuple[SessionState, ...]
    need_selection: bool = False
    # Statements run after it in the same transaction, with the session id as :id.
    also: tuple[TextClause, ...] = ()

    @property
    def statement(self) -> TextClause:
        """The guarded UPDATE; binds :id and :allowed (`allowed()`), returns the row as committed."""
        guard = f"AND {HAS_SELECTION}" if self.need_selection else ""
        return text(
            f"""
            UPDATE training_sessions
               SET {self.assignments}, trace_context = :trace_context, {ANNOUNCE}
             WHERE id = :id AND state = ANY(:allowed) {guard}
            RETURNING *"""
        )

    def params(self, session_id: int) -> dict[str, object]:
        """Binds :id, :allowed and the caller's trace context (imagetraining/tracing.py; '' when untraced)."""
        return {"id": session_id, "allowed": [s.value for s in self.source], "trace_context": traceparent()}


# The session stops training (pause, cancel, library offline): the chunks workers hold go back to
# pending at once, so a resume finds them claimable and a worker that still holds one writes nothing
# of it (its chunk fence no longer matches).
RELEASE_CHUNKS = text(
    """
    UPDATE training_jobs
       SET state = 'pending', lease_token = NULL, lease_expires_at = NULL, trained_by = NULL, update_time = now()
     WHERE session_id = :id AND state = 'running'
    """
)

_NEW_RUN = f"state = 'discovering', run_scope = 'all', {RESET_RUN}, {RESET_DISCOVERY}"
RESTARTABLE = (S.COMPLETED, S.CANCELLED, S.FAILED)

START = Transition("StartSession", (S.PENDING, S.FAILED), _NEW_RUN, (S.DISCOVERING,), need_selection=True)
RESTART_ALL = Transition("RestartSession", RESTARTABLE, _NEW_RUN, (S.DISCOVERING,), need_selection=True)
# Only the failed jobs again: straight to training when discovery had finished (RETRY_FAILED_JOBS).
RESTART_FAILED = Transition(
    "RestartSession",
    RESTARTABLE,
    f"state = CASE WHEN total_final THEN 'running' ELSE 'discovering' END, run_scope = 'failed_only', {RESET_RUN}",
    (S.DISCOVERING, S.RUNNING),
    need_selection=True,
)
PAUSE = Transition(
    "PauseSession",
    (S.DISCOVERING, S.RUNNING),
    "state = 'paused', resume_state = state",
    (S.PAUSED,),
    also=(RELEASE_CHUNKS,),
)
RESUME = Transition(
    "ResumeSession",
    (S.PAUSED,),
    "state = COALESCE(resume_state, 'discovering'), resume_state = NULL, state_reason = ''",
    (S.DISCOVERING, S.RUNNING),
)
CANCEL = Transition(
    "CancelSession",
    (S.PENDING, S.DISCOVERING, S.RUNNING, S.PAUSED),
    "state = 'cancelled', end_time = now(), state_reason = 'cancelled by a client'",
    (S.CANCELLED,),
    also=(RELEASE_CHUNKS,),
)
CLIENT_TRANSITIONS = (START, RESTART_ALL, RESTART_FAILED, PAUSE, RESUME, CANCEL)

# Config, selection and deletion: anything but an active run.
EDITABLE = tuple(s for s in SessionState if s not in ACTIVE_STATES)

DELETE = text("DELETE FROM training_sessions WHERE id = :id AND state = ANY(:allowed) RETURNING id")

# RestartSession(failed only): failed jobs back to pending and the counter down by as many, at once.
RETRY_FAILED_JOBS = text(
    """
    WITH retried AS (
        UPDATE training_jobs
           SET state = 'pending', error_class = '', error_message = '', update_time = now()
         WHERE session_id = :id AND state = 'failed'
        RETURNING 1
    )
    UPDATE training_sessions
       SET failed_images = failed_images - (SELECT count(*) FROM retried)
     WHERE id = :id
    RETURNING *
    """
)

# UpdateSession: a new name and/or config (the caller has checked the state under a row lock).
EDIT = text(
    """
    UPDATE training_sessions
       SET display_name = COALESCE(:display_name, display_name),
           config = COALESCE(CAST(:config AS jsonb), config),
           update_time = now()
     WHERE id = :id
    RETURNING *
    """
)

# UpdateSubdirectories: the selection changed (its rows are written by the caller).
TOUCH = text("UPDATE training_sessions SET update_time = now() WHERE id = :id RETURNING *")

# A relay's number for a message it builds from the row. SKIP LOCKED: a row locked by a worker's
# write (or a frozen worker's, until PostgreSQL ends it) is skipped this time, not waited for.
MINT_SEQUENCE = text(
    """
    UPDATE training_sessions
       SET event_sequence = event_sequence + 1
     WHERE id = (SELECT id FROM training_sessions WHERE id = :id FOR UPDATE SKIP LOCKED)
    RETURNING *, (owner_id IS NOT NULL AND lease_expires_at > now()) AS leased
    """
)

# ---- leases (discovery worker) -----------------------------------------------------------------------

# Active sessions whose workers died :max_attempts times end failed.
FAIL_EXHAUSTED = text(
    f"""
    UPDATE training_sessions
       SET state = 'failed',
           state_reason = 'worker crashed ' || attempts || ' times on this session',
           end_time = now(), current_directory = '', {DISOWN}, {ANNOUNCE}
     WHERE id IN (
           SELECT id FROM training_sessions
            WHERE {CLAIMABLE} AND attempts >= :max_attempts
            ORDER BY id
              FOR UPDATE SKIP LOCKED)
    RETURNING id, attempts
    """
)

# The lowest-id claimable session not in :busy, in one statement: two workers never get the same one.
CLAIM = text(
    f"""
    UPDATE training_sessions
       SET owner_id = :owner,
           owner_address = :address,
           lease_expires_at = now() + make_interval(secs => :lease),
           epoch = epoch + 1,
           attempts = attempts + 1,
           event_sequence = event_sequence + {SEQUENCE_BLOCK},
           discovery_started_at = CASE WHEN state = 'discovering'
                                       THEN COALESCE(discovery_started_at, now())
                                       ELSE discovery_started_at END,
           update_time = now()
     WHERE id = (
           SELECT id FROM training_sessions
            WHERE {CLAIMABLE} AND id <> ALL(CAST(:busy AS bigint[]))
            ORDER BY id
              FOR UPDATE SKIP LOCKED
            LIMIT 1)
    RETURNING *
    """
)

HEARTBEAT = text(
    f"""
    UPDATE training_sessions
       SET lease_expires_at = now() + make_interval(secs => :lease)
     WHERE {OWNED}
    RETURNING id
    """
)

# A graceful hand-back (pause, cancel, shutdown) is not a crash: :give_back returns the attempt, so
# that pausing and resuming a session many times never exhausts IMAGETRAINING_MAX_ATTEMPTS.
RELEASE = text(
    f"""
    UPDATE training_sessions
       SET {DISOWN}, attempts = GREATEST(attempts - :give_back, 0)
     WHERE {OWNED}
    RETURNING id
    """
)

# The first statement of every worker transaction: locks the row while the claim is current and the
# session is still in :state (a pause or cancel committed since makes it match nothing).
FENCE = text(
    f"""
    UPDATE training_sessions
       SET update_time = now()
     WHERE {OWNED} AND state = :state
    RETURNING discovery_checkpoint
    """
)

# One more block of stream numbers for the owner.
RESERVE_SEQUENCES = text(
    f"""
    UPDATE training_sessions
       SET event_sequence = event_sequence + {SEQUENCE_BLOCK}
     WHERE {OWNED}
    RETURNING event_sequence
    """
)

# The library went offline: paused where it was, the path in the reason, handed back with the attempt
# given back (an offline NAS is not a crash).
PAUSE_OFFLINE = text(
    f"""
    UPDATE training_sessions
       SET state = 'paused', resume_state = state, state_reason = :reason, current_directory = '',
           {DISOWN}, attempts = GREATEST(attempts - 1, 0), {ANNOUNCE}
     WHERE {OWNED} AND state IN ('discovering', 'running')
    RETURNING *
    """
)

# ---- discovery (the owner, fenced by the caller's FENCE in the same transaction) ---------------------

# A batch's counters and checkpoint. The walk's own counters restart from zero after a crash, so they
# are written as GREATEST(stored, walk's) and never go backwards.
ADVANCE_DISCOVERY = text(
    """
    UPDATE training_sessions
       SET directories_scanned = GREATEST(directories_scanned, :directories_scanned),
           files_seen = GREATEST(files_seen, :files_seen),
           images_found = GREATEST(images_found, :images_found),
           unreadable_paths = GREATEST(unreadable_paths, :unreadable),
           current_directory = :current_directory,
           assets_new = assets_new + :new,
           assets_changed = assets_changed + :changed,
           assets_unchanged = assets_unchanged + :unchanged,
           discovery_checkpoint = CAST(:checkpoint AS jsonb)
     WHERE id = :id
    RETURNING *
    """
)

# Finished jobs whose file changed (or whose hash is stale: another session saw the change first) go
# back to pending; the counters that counted them go down in the same statement. One pass over the
# session's job key for the batch, never a probe per file: right after a new session's first batches
# the statistics say it has no jobs, and the planner may then walk all of them for every probe (seen:
# 100,000 files taking 100 s).
REOPEN_CHANGED_JOBS = text(
    """
    WITH old AS (
        SELECT id, state FROM training_jobs
         WHERE session_id = :id AND asset_id = ANY(CAST(:asset_ids AS bigint[]))
           AND CASE WHEN asset_id = ANY(CAST(:changed_ids AS bigint[]))
                    THEN state IN ('completed', 'failed', 'skipped')
                    ELSE state IN ('completed', 'skipped')
               END
           FOR UPDATE
    ),
    reset AS (
        UPDATE training_jobs j
           SET state = 'pending', error_class = '', error_message = '', skip_reason = '',
               duplicate_of_asset_id = NULL, near_duplicate_of_asset_id = NULL, near_duplicate_distance = NULL,
               update_time = now()
          FROM old WHERE j.id = old.id
        RETURNING old.state AS old_state
    )
    UPDATE training_sessions
       SET processed_images = processed_images - (SELECT count(*) FROM reset WHERE old_state = 'completed'),
           failed_images = failed_images - (SELECT count(*) FROM reset WHERE old_state = 'failed'),
           skipped_images = skipped_images - (SELECT count(*) FROM reset WHERE old_state = 'skipped')
     WHERE id = :id
    """
)

# At the end of a run's walk (before TO_RUNNING): the session's trained images whose features another
# trainer made than the owner's (:trainer_name, :trainer_version, :model_digest) go back to pending,
# the counters down by as many, so RestartSession(ALL) after a trainer change retrains exactly them.
REOPEN_STALE_JOBS = text(
    """
    WITH stale AS (
        SELECT j.id FROM training_jobs j JOIN image_assets a ON a.id = j.asset_id
         WHERE j.session_id = :id AND j.state = 'completed'
           AND (a.trainer_name IS DISTINCT FROM :trainer_name OR a.trainer_version IS DISTINCT FROM :trainer_version
                OR a.model_digest IS DISTINCT FROM :model_digest)
           FOR UPDATE OF j
    ),
    reset AS (
        UPDATE training_jobs j
           SET state = 'pending', near_duplicate_of_asset_id = NULL, near_duplicate_distance = NULL,
               update_time = now()
          FROM stale WHERE j.id = stale.id
        RETURNING j.id
    )
    UPDATE training_sessions
       SET processed_images = processed_images - (SELECT count(*) FROM reset)
     WHERE id = :id
    RETURNING (SELECT count(*) FROM reset) AS reopened
    """
)

# discovering -> running: the walk is complete and the total final.
TO_RUNNING = text(
    f"""
    UPDATE training_sessions
       SET state = 'running', total_final = true,
           total_images = (SELECT count(*) FROM training_jobs WHERE session_id = :id),
           discovery_finished_at = now(), current_directory = '', {ANNOUNCE}
     WHERE id = :id
    RETURNING *
    """
)

# discovering -> failed: the complete walk found no image (:reason says where it looked).
NO_IMAGES = text(
    f"""
    UPDATE training_sessions
       SET state = 'failed', state_reason = :reason, total_final = true, total_images = 0,
           discovery_finished_at = now(), end_time = now(), current_directory = '', {DISOWN}, {ANNOUNCE}
     WHERE id = :id
    RETURNING *
    """
)

# ---- training (the owner, fenced by the caller's FENCE in the same transaction) ----------------------

# ---- training chunks (any worker: the owner or a helper) ---------------------------------------------

# A running session's pending jobs are claimed in chunks by any worker with pool capacity: the jobs
# go `running` under the chunk's token and lease. A chunk whose lease lapsed (its worker died or
# froze) goes back to pending first, so another worker trains it; the late worker's write then finds
# its token gone (CHUNK_FENCE) and writes nothing.
RECLAIM_EXPIRED_CHUNKS = text(
    """
    UPDATE training_jobs
       SET state = 'pending', lease_token = NULL, lease_expires_at = NULL, trained_by = NULL, update_time = now()
     WHERE session_id = :id AND state = 'running' AND lease_expires_at < now()
    """
)

# The first statement of a chunk claim: the session is running, and stays so until the claim
# commits (FOR SHARE: a pause or cancel waits for the claim and then releases its chunk; a claim
# behind a pause sees it paused and takes nothing).
LOCK_RUNNING_SESSION = text(
    f"""
    SELECT id FROM training_sessions
     WHERE id = :id AND state = 'running' AND {SAME_TRAINER}
       FOR SHARE
    """
)

# The owner stamps its trainer on the session when its training run starts (a new run, a resume, a
# takeover); from then on only workers running the same trainer claim chunks (LOCK_RUNNING_SESSION).
STAMP_TRAINER = text(
    f"""
    UPDATE training_sessions
       SET trainer_name = :trainer_name, trainer_version = :trainer_version, model_digest = :model_digest,
           embedding_dimension = :dimension
     WHERE {OWNED} AND state = 'running'
    RETURNING id
    """
)

# Up to :limit pending jobs after :after in id order (SKIP LOCKED: two workers never take the same
# job), after LOCK_RUNNING_SESSION in the same transaction; returns what training needs of each, and
# whether the asset's stored hash and features are still valid: same file, same trainer.
CLAIM_CHUNK = text(
    """
    WITH picked AS (
        SELECT id FROM training_jobs
         WHERE session_id = :id AND state = 'pending' AND id > :after
         ORDER BY id
         LIMIT :limit
           FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        UPDATE training_jobs j
           SET state = 'running', lease_token = :token, trained_by = :worker,
               lease_expires_at = now() + make_interval(secs => :lease), update_time = now()
          FROM picked
         WHERE j.id = picked.id
        RETURNING j.id, j.asset_id
    )
    SELECT c.id AS job_id, c.asset_id, a.path, a.size_bytes, a.mtime_ns,
           a.perceptual_hash, a.width, a.height, a.format, a.content_digest,
           (a.perceptual_hash IS NOT NULL AND a.hash_algorithm = :algorithm AND a.content_digest IS NOT NULL
            AND a.hashed_size_bytes = a.size_bytes AND a.hashed_mtime_ns = a.mtime_ns
            AND a.trainer_name = :trainer_name AND a.trainer_version = :trainer_version
            AND a.model_digest = :model_digest) AS trained_valid
      FROM claimed c JOIN image_assets a ON a.id = c.asset_id
     ORDER BY c.id
    """
)

# The heartbeat of a worker's chunks in flight; returns the tokens still held.
EXTEND_CHUNKS = text(
    """
    UPDATE training_jobs
       SET lease_expires_at = now() + make_interval(secs => :lease)
     WHERE id = ANY(CAST(:job_ids AS bigint[])) AND state = 'running'
       AND lease_token = ANY(CAST(:tokens AS text[]))
    RETURNING lease_token
    """
)

# A worker gives back the chunks it still holds (it stopped before writing them).
RELEASE_HELD_CHUNKS = text(
    """
    UPDATE training_jobs
       SET state = 'pending', lease_token = NULL, lease_expires_at = NULL, trained_by = NULL, update_time = now()
     WHERE id = ANY(CAST(:job_ids AS bigint[])) AND state = 'running'
       AND lease_token = ANY(CAST(:tokens AS text[]))
    """
)

# The first statement of a chunk's write: the session is still running (a pause or cancel since
# makes it match nothing), its row locked, so every chunk commit of a session is serialised.
TRAINING_FENCE = text(
    """
    UPDATE training_sessions
       SET update_time = now()
     WHERE id = :id AND state = 'running'
    RETURNING id
    """
)

# The second: the chunk's jobs are still this chunk's (a lapsed lease reclaimed, or a pause, takes
# them away); the caller compares the count with the chunk's size.
CHUNK_FENCE = text(
    """
    SELECT id FROM training_jobs
     WHERE id = ANY(CAST(:job_ids AS bigint[])) AND state = 'running' AND lease_token = :token
       FOR UPDATE
    """
)

# A chunk's outcomes: jobs, counters and per-subdirectory trained counts in one statement, so they
# cannot disagree.
RECORD_OUTCOMES = text(
    """
    WITH r AS (
        SELECT * FROM unnest(CAST(:job_ids AS bigint[]), CAST(:states AS text[]), CAST(:error_classes AS text[]),
                             CAST(:error_messages AS text[]), CAST(:skip_reasons AS text[]),
                             CAST(:duplicate_of AS bigint[]), CAST(:near_of AS bigint[]),
                             CAST(:near_distances AS smallint[]))
                 AS t(job_id, state, error_class, error_message, skip_reason, duplicate_of, near_of, near_distance)
    ),
    target AS (
        -- One primary-key probe per job of the chunk (LIMIT 1: unique). Filtering the UPDATE on
        -- session and state let the planner hash every pending job of the session for every chunk
        -- (stale statistics after the bulk insert of jobs), which made training quadratic.
        SELECT r.*
          FROM r
          CROSS JOIN LATERAL (
                SELECT x.id FROM training_jobs x
                 WHERE x.id = r.job_id AND x.session_id = :id AND x.state = 'running' AND x.lease_token = :token
                 LIMIT 1) x
    ),
    done AS (
        UPDATE training_jobs j
           SET state = t.state, error_class = t.error_class, error_message = t.error_message,
               skip_reason = t.skip_reason, duplicate_of_asset_id = t.duplicate_of,
               near_duplicate_of_asset_id = t.near_of, near_duplicate_distance = t.near_distance,
               lease_token = NULL, lease_expires_at = NULL, trained_by = :worker,
               attempts = j.attempts + 1, update_time = now()
          FROM target t
         WHERE j.id = t.job_id
        RETURNING j.asset_id, j.subdirectory_id, j.state
    ),
    credited AS (  -- the selected directory that found the image, and selected directories nested in it
        SELECT subdirectory_id AS id FROM done WHERE state IN ('completed', 'skipped')
        UNION ALL
        SELECT s2.id
          FROM done
          JOIN image_assets a ON a.id = done.asset_id
          JOIN session_subdirectories s2
            ON s2.id = ANY(CAST(:nested_ids AS bigint[])) AND starts_with(a.path, rtrim(s2.path, '/') || '/')
         WHERE done.state IN ('completed', 'skipped')
    ),
    trained AS (
        UPDATE session_subdirectories s
           SET trained_count = s.trained_count + d.n
          FROM (SELECT id, count(*) AS n FROM credited WHERE id IS NOT NULL GROUP BY id) d
         WHERE s.id = d.id
    )
    UPDATE training_sessions
       SET processed_images = processed_images + (SELECT count(*) FROM done WHERE state = 'completed'),
           failed_images = failed_images + (SELECT count(*) FROM done WHERE state = 'failed'),
           skipped_images = skipped_images + (SELECT count(*) FROM done WHERE state = 'skipped'),
           -- Wall-clock time: the time since the last chunk commit of any worker, at most this
           -- chunk's own time, so two workers training at once do not count a second twice and a
           -- pause in between counts nothing.
           training_seconds = training_seconds
               + LEAST(:seconds, COALESCE(EXTRACT(EPOCH FROM now() - training_mark), :seconds)),
           training_mark = now()
     WHERE id = :id
    RETURNING *
    """
)

# Duplicates, decided when training has ended from every worker's results (imagetraining/duplicates.py
# `resolve`): the labels that changed, with the counters moved between processed and skipped in the
# same statement. Run by the owner just before FINISH, in the same transaction.
APPLY_DUPLICATE_LABELS = text(
    """
    WITH r AS (
        SELECT * FROM unnest(CAST(:job_ids AS bigint[]), CAST(:states AS text[]), CAST(:skip_reasons AS text[]),
                             CAST(:duplicate_of AS bigint[]), CAST(:near_of AS bigint[]),
                             CAST(:near_distances AS smallint[]))
                 AS t(job_id, state, skip_reason, duplicate_of, near_of, near_distance)
    ),
    old AS (
        SELECT j.id, j.state FROM training_jobs j JOIN r ON r.job_id = j.id
         WHERE j.session_id = :id AND j.state IN ('completed', 'skipped')
           FOR UPDATE OF j
    ),
    done AS (
        UPDATE training_jobs j
           SET state = r.state, skip_reason = r.skip_reason, duplicate_of_asset_id = r.duplicate_of,
               near_duplicate_of_asset_id = r.near_of, near_duplicate_distance = r.near_distance,
               update_time = now()
          FROM r JOIN old ON old.id = r.job_id
         WHERE j.id = r.job_id
        RETURNING old.state AS was, j.state AS now
    )
    UPDATE training_sessions
       SET processed_images = processed_images + (SELECT count(*) FILTER (WHERE now = 'completed')
                                                         - count(*) FILTER (WHERE was = 'completed') FROM done),
           skipped_images = skipped_images + (SELECT count(*) FILTER (WHERE now = 'skipped')
                                                     - count(*) FILTER (WHERE was = 'skipped') FROM done)
     WHERE id = :id
    """
)

# running -> completed (or failed, when every image failed), once no job is pending or held in a chunk.
FINISH = text(
    f"""
    WITH counts AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE state = 'failed') AS failed,
               count(*) FILTER (WHERE state IN ('pending', 'running')) AS pending
          FROM training_jobs WHERE session_id = :id
    )
    UPDATE training_sessions
       SET state = CASE WHEN counts.total > 0 AND counts.failed = counts.total THEN 'failed' ELSE 'completed' END,
           state_reason = CASE WHEN counts.total > 0 AND counts.failed = counts.total
                               THEN 'all ' || counts.total || ' images failed: see ListJobs' ELSE '' END,
           -- clock_timestamp(): when the session completes, not when its transaction began (the
           -- duplicate labels before it may take seconds on a library of copies).
           end_time = clock_timestamp(), current_directory = '', {DISOWN}, {ANNOUNCE}
      FROM counts
     WHERE id = :id AND counts.pending = 0
    RETURNING training_sessions.*
    """
)

# The state changes the worker's statements make (a client transition's are on the Transition).
WORKER_CHANGES: dict[str, tuple[tuple[SessionState, SessionState], ...]] = {
    "TO_RUNNING": ((S.DISCOVERING, S.RUNNING),),
    "NO_IMAGES": ((S.DISCOVERING, S.FAILED),),
    "FINISH": ((S.RUNNING, S.COMPLETED), (S.RUNNING, S.FAILED)),
    "FAIL_EXHAUSTED": ((S.DISCOVERING, S.FAILED), (S.RUNNING, S.FAILED)),
    "PAUSE_OFFLINE": ((S.DISCOVERING, S.PAUSED), (S.RUNNING, S.PAUSED)),
}
