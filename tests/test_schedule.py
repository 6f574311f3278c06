"""The scheduler's rules, message by message: shares, throttling, breaker, lost workers."""

from __future__ import annotations

from distributed_downloader.config import Settings
from distributed_downloader.fetch.retry import parse_retry_after
from distributed_downloader.protocol import (
    Assign,
    BatchFinished,
    BatchRef,
    Budget,
    DiskFull,
    Report,
    ServerNews,
    Stop,
    WantWork,
)
from distributed_downloader.policy import RatePolicy, ServerPolicy
from distributed_downloader.schedule import Scheduler, ServerState, workers_allowed


def server(name: str, batches: int, rate: float, rows: int = 100,
           settings: Settings | None = None) -> ServerState:
    rate_policy = RatePolicy.from_settings((settings or Settings()).politeness)
    policy = ServerPolicy.start(rate_policy, rate, rate, 0)
    state = ServerState(name=name, policy=policy, connections=8, total_batches=batches)
    for partition in range(batches):
        state.pending.append(BatchRef(name, partition, rows))
        state.remaining_rows += rows
    return state


def budgets(out, name: str) -> dict[int, Budget]:
    return {w: m for w, m in out if isinstance(m, Budget) and m.server_name == name}


def test_shares_of_one_server_add_up_to_its_budget() -> None:
    scheduler = Scheduler([server("big", 10, rate=100)], Settings(), range(4), now=0)
    shares = {}
    for worker in range(4):
        for target, message in scheduler.handle(WantWork(worker), now=0):
            if isinstance(message, Budget):
                shares[target] = message.rate
    assert len(shares) == 4
    assert abs(sum(shares.values()) - 100) < 1e-9
    assert set(shares.values()) == {25.0}


def test_a_slow_server_is_not_split_and_the_longest_goes_first() -> None:
    servers = [server("small", 1, rate=10), server("slow", 5, rate=10), server("fast", 5, 100)]
    scheduler = Scheduler(servers, Settings(), range(4), now=0)
    first = [m for _, m in scheduler.handle(WantWork(0), now=0) if isinstance(m, Assign)]
    assert first[0].batch.server_name == "slow"  # 500 rows at 10/s bound the run
    second = [m for _, m in scheduler.handle(WantWork(1), now=0) if isinstance(m, Assign)]
    assert second[0].batch.server_name == "small"
    third = [m for _, m in scheduler.handle(WantWork(2), now=0) if isinstance(m, Assign)]
    assert third[0].batch.server_name == "fast"
    # The fourth joins "fast" (two shares of 50/s), not "slow": half of 10/s is not worth it.
    fourth = [m for _, m in scheduler.handle(WantWork(3), now=0) if isinstance(m, Assign)]
    assert fourth[0].batch.server_name == "fast"
    assert scheduler.servers["slow"].workers == {0}
    # A third share of fast (33/s) is still worth it; a fourth (25/s) too, a fifth (20/s) not.
    again = [m for _, m in scheduler.handle(WantWork(1), now=0) if isinstance(m, Assign)]
    assert again[0].batch.server_name == "fast"


def test_throttling_halves_once_per_burst_and_pauses_everyone() -> None:
    scheduler = Scheduler([server("s", 4, rate=40)], Settings(), range(2), now=0)
    scheduler.handle(WantWork(0), now=0)
    scheduler.handle(WantWork(1), now=0)
    news = ServerNews(throttled=1, retry_after_until=30.0)
    out = scheduler.handle(Report(0, {"s": news}), now=1.0)
    # Both pause; they resume one interval of the server's new rate (20/s) apart.
    assert {w: (b.rate, b.paused_until) for w, b in budgets(out, "s").items()} == \
        {0: (10.0, 30.0), 1: (10.0, 30.05)}
    # The other worker saw the same burst: no second halving within the cooldown.
    scheduler.handle(Report(1, {"s": ServerNews(throttled=1)}), now=1.2)
    assert scheduler.servers["s"].rate == 20.0


def test_rate_grows_back_rests_below_the_429_then_tries_it_again() -> None:
    state = server("s", 4, rate=10)
    scheduler = Scheduler([state], Settings(), range(1), now=0)
    scheduler.handle(WantWork(0), now=0)
    scheduler.handle(Report(0, {"s": ServerNews(throttled=1)}), now=1)
    assert state.rate == 5.0
    seen = {}
    for second in range(2, 200):
        # The server answers every request: the rate is used, and it holds.
        scheduler.handle(Report(0, {"s": ServerNews(answered=round(state.rate))}), now=second)
        scheduler.tick(now=second)
        seen[second] = state.rate
    assert seen[30] == 9.0  # 90% of the 10/s that was throttled, not 10, for a while
    assert seen[199] == 10.0  # a quiet minute later that rate is tried again, and holds


def test_a_failed_url_is_not_a_throttle_but_an_overload_is() -> None:
    state = server("s", 4, rate=10)
    scheduler = Scheduler([state], Settings(), range(1), now=0)
    scheduler.handle(WantWork(0), now=0)
    for second in range(1, 21):  # 2% of answers fail (a 503 without Retry-After)
        failed = 1 if second % 2 else 0
        scheduler.handle(Report(0, {"s": ServerNews(answered=50 - failed, failed=failed,
                                                    failed_urls=failed)}), now=second)
    assert state.rate == 10.0
    # 10% of its URLs are dead links, each asked five times: many failed answers, few URLs.
    for second in range(21, 60):
        scheduler.handle(Report(0, {"s": ServerNews(answered=45, failed=25, failed_urls=5)}),
                         now=second)
    assert state.rate == 10.0
    # Then half of the answers fail: within seconds that is overload, the rate comes down.
    for second in range(60, 80):
        scheduler.handle(Report(0, {"s": ServerNews(answered=25, failed=25, failed_urls=25)}),
                         now=second)
        if state.rate < 10:
            break
    assert state.rate == 5.0 and second <= 75  # the 20-s window turns within ~10 s


def test_breaker_opens_then_gives_up() -> None:
    settings = Settings(server_down_after=10)
    scheduler = Scheduler([server("down", 2, rate=10, settings=settings)], settings, range(2),
                          now=0)
    scheduler.handle(WantWork(0), now=0)
    out = scheduler.handle(Report(0, {"down": ServerNews(failures=5)}), now=1)
    budget = budgets(out, "down")[0]
    assert budget.connections == 1 and budget.paused_until == 2.0  # paused, then one probe
    scheduler.handle(Report(0, {"down": ServerNews(failures=6)}), now=2.5)
    assert scheduler.servers["down"].paused_until == 4.5  # back-off doubled
    out = scheduler.tick(now=12)
    assert budgets(out, "down")[0].dead
    # Its other batch goes to the next worker asking, to be written as errors.
    assigned = [m for _, m in scheduler.handle(WantWork(1), now=12) if isinstance(m, Assign)]
    assert assigned[0].give_up


def test_a_success_closes_the_breaker() -> None:
    scheduler = Scheduler([server("s", 2, rate=10)], Settings(), range(1), now=0)
    scheduler.handle(WantWork(0), now=0)
    scheduler.handle(Report(0, {"s": ServerNews(failures=5)}), now=1)
    out = scheduler.handle(Report(0, {"s": ServerNews(answered=1)}), now=3)
    assert budgets(out, "s")[0].connections == 8
    assert scheduler.servers["s"].policy.breaker.failing_since is None


def test_a_worker_leaving_a_server_takes_its_failure_streak_along() -> None:
    scheduler = Scheduler([server("s", 2, rate=10)], Settings(), range(2), now=0)
    first = next(m for _, m in scheduler.handle(WantWork(0), now=0) if isinstance(m, Assign))
    scheduler.handle(Report(0, {"s": ServerNews(failed=3, failures=3)}), now=1)
    second = next(m for _, m in scheduler.handle(BatchFinished(0, first.batch, 97, 3), now=2)
                  if isinstance(m, Assign))  # it goes on with the server's next batch
    scheduler.handle(BatchFinished(0, second.batch, 100, 0), now=3)
    assert 0 not in scheduler.servers["s"].workers
    # Another worker's two failures (between good answers) do not add up to five with it.
    scheduler.handle(Report(1, {"s": ServerNews(answered=10, failed=2, failures=2)}), now=4)
    assert not scheduler.servers["s"].probing


def test_lost_worker_batches_go_back_and_the_run_ends() -> None:
    scheduler = Scheduler([server("s", 1, rate=10)], Settings(), range(2), now=0)
    assign = next(m for _, m in scheduler.handle(WantWork(0), now=0) if isinstance(m, Assign))
    scheduler.handle(WantWork(1), now=0)  # hungry: nothing left
    out = scheduler.worker_lost(0, now=1)
    again = [m for w, m in out if isinstance(m, Assign) and w == 1]
    assert again and again[0].batch == assign.batch
    scheduler.handle(BatchFinished(1, assign.batch, 100, 0), now=2)
    assert scheduler.finished
    assert [(w, type(m)) for w, m in scheduler.tick(now=3)] == [(1, Stop)]


def test_schedule_rules_of_the_original() -> None:
    rules = {5000: 40, 1000: 20, 500: 10, 200: 8, 100: 4, 50: 2, 1: 1}
    assert [workers_allowed(rules, n) for n in (1, 2, 60, 150, 600, 6000)] == \
        [1, 1, 2, 4, 10, 40]
    assert workers_allowed({}, 10_000) is None


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_a_pause_the_server_asked_for_outlives_the_run() -> None:
    """Retry-After 3600 at the end of a Slurm period: the next period keeps it, and a pause
    longer than a failing server is waited for gives the server up for this run."""
    from distributed_downloader.fetch import _starting_budget
    from distributed_downloader.profiles import ServerProfile

    settings = Settings(server_down_after=60)
    state = server("s", 2, rate=10, settings=settings)
    profile = ServerProfile("s", 5.0, 8, paused_until=1000.0 + 3600)
    _starting_budget(state, profile, None, now=1000.0, retry_errors=False)
    assert state.paused_until == 4600.0
    scheduler = Scheduler([state], settings, range(1), now=1000.0)
    out = scheduler.tick(now=1001.0)
    assert state.dead and state.give_up.code == "http_429"
    assert "3599 s" in state.give_up.message
    assigned = [m for _, m in scheduler.handle(WantWork(0), now=1001.0) if isinstance(m, Assign)]
    assert assigned[0].give_up is state.give_up and out == []


def test_a_full_disk_stops_every_worker_and_hands_out_nothing_more() -> None:
    scheduler = Scheduler([server("a", 4, rate=40), server("b", 4, rate=40)], Settings(),
                          range(3), now=0)
    for worker in range(3):
        scheduler.handle(WantWork(worker), now=0)
    out = scheduler.handle(DiskFull(1, "/run/downloaded_images", 4096, 0), now=1)
    assert out == [(0, Stop()), (1, Stop()), (2, Stop())]
    # Nothing more is handed out: not the next batch of a finished one, not a lost
    # worker's batch, not to a worker asking.
    [batch] = scheduler.leases[0].values()
    finished = scheduler.handle(BatchFinished(0, batch, 100, 0), now=2)
    assert [m for _, m in finished if isinstance(m, Assign)] == []
    assert [m for _, m in scheduler.worker_lost(1, now=2) if isinstance(m, Assign)] == []
    assert not [m for _, m in scheduler.handle(WantWork(2), now=2) if isinstance(m, Assign)]
    assert scheduler.tick(now=3) == []  # the Stops are not sent twice
    assert scheduler.disk_full == DiskFull(1, "/run/downloaded_images", 4096, 0)


def test_the_coordinators_own_full_disk_stops_the_workers_at_the_next_tick() -> None:
    scheduler = Scheduler([server("a", 4, rate=40)], Settings(), range(2), now=0)
    scheduler.handle(WantWork(0), now=0)
    scheduler.out_of_space(DiskFull(None, "/run", 512))
    assert [m for _, m in scheduler.handle(WantWork(1), now=1) if isinstance(m, Assign)] == []
    assert [(w, m) for w, m in scheduler.tick(now=1) if isinstance(m, Stop)] == \
        [(0, Stop()), (1, Stop())]


def test_a_stop_hands_out_no_batch_after_it() -> None:
    scheduler = Scheduler([server("a", 6, rate=10), server("b", 6, rate=10)], Settings(),
                          range(3), now=0)
    first = [m for _, m in scheduler.handle(WantWork(0), now=0) if isinstance(m, Assign)][0]
    scheduler.handle(WantWork(1), now=0)  # worker 2 is still starting: it has not asked yet
    out = scheduler.stop()
    assert sorted(w for w, m in out if isinstance(m, Stop)) == [0, 1, 2]
    assert scheduler.stop() == []  # told once
    # Whatever asks afterwards gets no batch: a late WantWork, a finished batch, a lost worker.
    late = scheduler.handle(WantWork(2), now=1)
    finished = scheduler.handle(BatchFinished(0, first.batch, 10, 0), now=1)
    lost = scheduler.worker_lost(1, now=1)
    ticked = scheduler.tick(now=2)
    assert not [m for _, m in late + finished + lost + ticked if isinstance(m, Assign)]
    assert not scheduler.finished  # the batches left are fetched on resume


def test_progress_counts_a_batch_once_when_its_worker_is_lost() -> None:
    """451/400 once: a killed worker's uncommitted rows are fetched again by another; counted by
    batch, the run's progress ends at exactly its rows."""
    scheduler = Scheduler([server("s", 2, rate=10, rows=100)], Settings(), range(2), now=0)
    batch = [m for _, m in scheduler.handle(WantWork(0), now=0) if isinstance(m, Assign)][0].batch
    scheduler.handle(Report(0, {"s": ServerNews(successes=60)}, batches={batch.key: (58, 2)}),
                     now=1)
    assert (scheduler.successes, scheduler.errors) == (58, 2)
    scheduler.worker_lost(0, now=2)  # killed: 20 of its rows were committed, 40 not
    assert scheduler.successes + scheduler.errors == 0
    again = [m for _, m in scheduler.handle(WantWork(1), now=2) if isinstance(m, Assign)][0]
    assert again.batch == batch
    scheduler.handle(Report(1, {"s": ServerNews(successes=80)}, batches={batch.key: (79, 1)}),
                     now=3)
    scheduler.handle(Report(0, {"s": ServerNews(successes=1)}, batches={batch.key: (59, 2)}),
                     now=3)  # a late report of the lost worker counts for nothing
    scheduler.handle(BatchFinished(1, batch, 97, 3), now=4)  # the batch's committed rows
    assert (scheduler.successes, scheduler.errors) == (97, 3)


def test_progress_keeps_the_rows_of_a_worker_that_stopped_cleanly() -> None:
    from distributed_downloader.protocol import WorkerStopped

    scheduler = Scheduler([server("s", 1, rate=10, rows=100)], Settings(), range(2), now=0)
    batch = [m for _, m in scheduler.handle(WantWork(0), now=0) if isinstance(m, Assign)][0].batch
    scheduler.handle(Report(0, {"s": ServerNews(successes=30)}, batches={batch.key: (30, 0)}),
                     now=1)
    scheduler.handle(WorkerStopped(0, interrupted=True), now=2)  # its rows were committed
    scheduler.worker_lost(0, now=2)
    assert scheduler.successes == 30
    scheduler.handle(WantWork(1), now=2)
    scheduler.handle(Report(1, {"s": ServerNews(successes=70)}, batches={batch.key: (70, 0)}),
                     now=3)
    assert scheduler.successes == 100
    scheduler.handle(BatchFinished(1, batch, 100, 0), now=4)
    assert (scheduler.successes, scheduler.errors) == (100, 0)


def test_many_small_servers_go_out_at_once_in_even_shares() -> None:
    """A worker with room takes on many small servers at once (each WantWork one more), up to
    an even share of the unfinished batches: the other worker's share is left for it."""
    servers = [server(f"s{i}", 1, rate=1, rows=20) for i in range(240)]
    scheduler = Scheduler(servers, Settings(), range(2), now=0)

    def asks(worker: int, times: int) -> int:
        return sum(isinstance(m, Assign) for _ in range(times)
                   for _, m in scheduler.handle(WantWork(worker), now=0))

    assert asks(0, 200) == 120  # far more than one batch in flight, but not the others'
    assert asks(1, 200) == 120
    in_flight = [s for s in servers if s.workers]
    assert len(in_flight) == 240


def test_a_first_contacted_servers_budget_says_so_until_its_warm_up_ends() -> None:
    """The worker lets a first contact's few requests go ahead of the others' for room (their
    answers are what raise its pace); the flag ends with the warm-up, the pace unchanged."""
    state = server("new", 1, rate=10)
    state.policy.control.first_contact()
    scheduler = Scheduler([state], Settings(), range(1), now=0)
    first = budgets(scheduler.handle(WantWork(0), now=0), "new")[0]
    assert first.first_contact and first.rate == 1.0  # as careful as before
    rates = []
    for second in range(1, 6):
        out = scheduler.handle(Report(0, {"new": ServerNews(answered=1, successes=1)}),
                               now=second)
        if (budget := budgets(out, "new").get(0)) is not None:
            rates.append((budget.rate, budget.first_contact))
    assert [flag for _, flag in rates] == [True, True, False]  # three steps, the last at 10/s
    assert rates[-1][0] == 10.0 and all(rate < 10.0 for rate, _ in rates[:-1])
