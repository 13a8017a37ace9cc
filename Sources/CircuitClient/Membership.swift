import CircuitAPI

/// A host joining or leaving the cluster, as the replicated log has it. The host is named by its id (`X` and 16 hex
/// digits), the slides' `WorkerID`.
public enum MembershipEvent: Sendable, Hashable, CustomStringConvertible {
    case joined(String)
    case left(String)

    /// The host that joined or left.
    public var host: String {
        switch self {
        case .joined(let h), .left(let h): return h
        }
    }

    public var description: String {
        switch self {
        case .joined(let h): return "joined \(h)"
        case .left(let h): return "left \(h)"
        }
    }
}

/// The slides' Membership API: each `waitForJoinOrLeave()` answers the next host that joined or left. First a join
/// for each host live when the membership was made (sorted by id), as a `@join` subscription lists them; then each
/// change from then on as the replicated log has it, so every client sees the changes in the same order. A host
/// announced once is announced again only after it left (a host that expires leaves). Read from the watch of the
/// node the client asks first; if that watch ends (the node stopped), `waitForJoinOrLeave` throws, and a new
/// `membership()` begins again with the live hosts. Used by one task at a time, like any iterator.
public struct Membership: AsyncIteratorProtocol {
    public typealias Element = MembershipEvent

    private let endpoints: [String]
    /// The live hosts listed at the start, not yet answered.
    private var listed: [String]
    /// The hosts announced as joined and not since as left.
    private var known: Set<String>
    private var changes: AsyncThrowingStream<EventView, any Error>.AsyncIterator

    init(client: CircuitClient) async throws(CircuitClientError) {
        endpoints = client.endpoints
        // The changes are watched from the node's revision before the listing, which is linearizable (as late or
        // later): a change in between is seen in both, and answered once.
        let revision = try await client.status().revision
        listed = try await client.members().filter { $0.state == "alive" }.map(\.id).sorted()
        known = Set(listed)
        changes = client.watch("/", from: revision + 1, hostsOnly: true).makeAsyncIterator()
    }

    /// The next host that joined or left.
    public mutating func waitForJoinOrLeave() async throws(CircuitClientError) -> MembershipEvent {
        if !listed.isEmpty { return .joined(listed.removeFirst()) }
        while true {
            let change: EventView?
            do {
                change = try await changes.next()
            } catch let error as CircuitClientError {
                throw error
            } catch {
                throw .unreachable(endpoints: endpoints, why: "\(error)")
            }
            guard let change else { throw .badAnswer("the membership's watch ended") }
            let host = String(change.path.drop { $0 == "/" })
            switch change.kind {
            case "host_joined": if known.insert(host).inserted { return .joined(host) }
            case "host_left": if known.remove(host) != nil { return .left(host) }
            default: continue
            }
        }
    }

    /// The same, for `while let event = try await membership.next()`.
    public mutating func next() async throws -> MembershipEvent? {
        try await waitForJoinOrLeave()
    }
}

extension CircuitClient {
    /// The cluster's membership as the slides' API has it, from now on: `var m = try await client.membership()`,
    /// then `try await m.waitForJoinOrLeave()` for each event.
    public func membership() async throws(CircuitClientError) -> Membership { try await Membership(client: self) }
}
