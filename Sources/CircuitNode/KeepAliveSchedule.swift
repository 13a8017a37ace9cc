import Logging

/// When a host (member or worker) sends its session's keep-alives, how long it waits for each, and when to say that the
/// session is at risk. A pure value: the caller passes the time.
///
/// A keep-alive is due a third of the TTL after the last answered one, as ZooKeeper's clients ping; the lease is
/// counted from when the answered one was sent (the leader renewed it on receipt, not when its answer arrived). One
/// that is not answered (no answer within its timeout, or an error) does not count: the next goes out a tenth of the
/// TTL later (not at once: thousands of workers retrying through an election would flood the members), not a third of
/// the TTL later. Each waits at most a fifth of the TTL (at least 200 ms): after a prompt answer, the next two can
/// each be stuck for their whole timeout and a third still goes out (at about 0.93 of the TTL) before the lease runs
/// out. Before, a call that hung for its whole 5 s timeout was followed by a pause of a third of the TTL: with the
/// default TTL of 5 s, one stuck call was an expiry.
struct KeepAliveSchedule: Sendable {
    typealias Instant = ContinuousClock.Instant

    let ttl: Duration
    /// When the last keep-alive (or the registration) that was answered was sent: the lease runs from about then.
    private(set) var lastAnswered: Instant
    /// When a keep-alive last went unanswered, if one has since the last answer.
    private var lastFailed: Instant?
    /// Whether `failed` has reported the lease at risk since the last answer.
    private var warned = false

    init(ttlMillis: UInt64, now: Instant) {
        ttl = .milliseconds(Int64(clamping: ttlMillis))
        lastAnswered = now
    }

    /// How long one keep-alive may wait for its answer.
    var callTimeout: Duration { max(.milliseconds(200), ttl / 5) }

    /// Whether a keep-alive is to be sent now.
    func isDue(now: Instant) -> Bool {
        now - lastAnswered >= ttl / 3 && lastFailed.map { now - $0 >= ttl / 10 } ?? true
    }

    /// A keep-alive (or the registration) sent at `sent` was answered at `now`. Answers how long the session had gone
    /// without one if that was more than two thirds of its TTL (it came close to running out: a host starved of time,
    /// or a slow path to the leader), nil otherwise.
    @discardableResult
    mutating func answered(sentAt sent: Instant, at now: Instant) -> Duration? {
        let silent = now - lastAnswered
        lastAnswered = sent
        lastFailed = nil
        warned = false
        return silent > ttl * 2 / 3 ? silent : nil
    }

    /// A keep-alive went unanswered at `now`. Answers how long the session has gone without one if that is more than
    /// two thirds of its TTL and not yet reported (the lease may run out before the next is answered); nil otherwise.
    mutating func failed(at now: Instant) -> Duration? {
        lastFailed = now
        let silent = now - lastAnswered
        guard !warned, silent > ttl * 2 / 3 else { return nil }
        warned = true
        return silent
    }

    /// What a keep-alive sent at `sent` came to, recorded at `now`; answers what the host is to warn of, if anything.
    /// A session found gone is the caller's to handle: nothing is recorded.
    mutating func record(_ outcome: KeepAliveOutcome, sentAt sent: Instant, at now: Instant) -> LeaseWarning? {
        switch outcome {
        case .renewed: return answered(sentAt: sent, at: now).map(LeaseWarning.answeredLate)
        case .unanswered: return failed(at: now).map(LeaseWarning.atRisk)
        case .gone: return nil
        }
    }
}

/// What a keep-alive came to: the lease renewed, the session gone (404), or no answer (or another error).
enum KeepAliveOutcome: Sendable {
    case renewed, gone, unanswered

    /// From the HTTP status of the answer (nil: none came).
    init(status: Int?) {
        self = status == 200 ? .renewed : status == 404 ? .gone : .unanswered
    }
}

/// A lease that came close to running out, or may: logged by members and workers alike.
enum LeaseWarning: Sendable, Equatable {
    /// Answered after this long without an answer.
    case answeredLate(Duration)
    /// Unanswered for this long.
    case atRisk(Duration)

    func log(to logger: Logger, session: UInt64) {
        switch self {
        case .answeredLate(let silent):
            logger.warning("a keep-alive was answered late", metadata: ["session": "\(session)", "since_the_last": "\(silent)"])
        case .atRisk(let silent):
            logger.warning("the session's lease is at risk: no keep-alive answered", metadata: ["session": "\(session)", "for": "\(silent)"])
        }
    }
}
