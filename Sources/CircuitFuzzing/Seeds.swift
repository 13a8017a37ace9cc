import CircuitAPI
import CircuitClient
import CircuitRaft
import CircuitStateMachine
import CircuitTransport
import NIOCore

extension FuzzTargets {
    /// Valid inputs for each target, from which the fuzzers start (`circuit-fuzz seeds DIR` writes them; they are
    /// committed under `Fuzz/seeds/`): a fuzzer that starts from well-formed bytes reaches deep into the decoders.
    public static func seeds() -> [String: [[UInt8]]] {
        // Command entries as `command` cuts them: a length byte, then the entry without its format byte.
        func entries(_ commands: [Command]) -> [UInt8] {
            commands.flatMap { command -> [UInt8] in
                let body = Array(command.encoded.dropFirst())
                return body.count < 256 ? [UInt8(body.count)] + body : []
            }
        }
        let host = "X00000000000000a1"
        let register = Command.registerHost(
            id: host, peerAddress: "10.0.0.1:7701", clientAddress: "10.0.0.1:7700", role: .voter, ttlMillis: 5000)
        let commands: [[UInt8]] = [
            entries([register, .put(path: "/records/a", value: Array("v".utf8), session: 0)]),
            entries([register, .create(path: "/\(host)/c", element: .chan(capacity: 4), session: 0, sequential: false)]),
            entries([.grantSession(owner: "client", ttlMillis: 3000), .put(path: "/records/e", value: [1], session: 1),
                     .compareAndSet(path: "/records/e", version: 1, value: [2]), .delete(path: "/records/e", version: 2)]),
            entries([.transaction([.check(path: "/records/a", version: 0), .put(path: "/records/b", value: [], session: 0)])]),
            entries([register, .create(path: "/\(host)/p", element: .proc(ProcState(command: ProcCommand(path: "/bin/true"))), session: 0, sequential: false),
                     .leaveHost(id: host)]),
        ]
        func frames(_ list: [PeerFrame]) -> [UInt8] {
            var buffer = ByteBuffer()
            for f in list { PeerCodec.encode(f, into: &buffer) }
            return [3] + Array(buffer.readableBytesView)
        }
        let peer: [[UInt8]] = [
            frames([.hello(version: PeerFrame.protocolVersion, clusterID: 7, hostID: 2), .welcome(hostID: 1)]),
            frames([.refused(reason: "cluster id 2, this node belongs to 1")]),
            frames([.raft([Message(kind: .append, from: 1, to: 2, term: 3, logTerm: 3, index: 7,
                                   entries: [Entry(term: 3, index: 8, data: [1, 2, 3])], commit: 7)])]),
            frames([.raft([Message(kind: .vote, from: 2, to: 1, term: 4, logTerm: 3, index: 9),
                           Message(kind: .heartbeat, from: 1, to: 2, term: 4, commit: 9)])]),
        ]
        let element = #"{"kind":"proc","command":{"path":"/bin/echo","args":["hi"]}}"#
        let http: [[UInt8]] = [
            "GET /v1/records/app/config?consistency=stale HTTP/1.1\r\nHost: a\r\n\r\n",
            "PUT /v1/namespace/X00000000000000a1/p HTTP/1.1\r\nHost: a\r\nContent-Length: \(element.utf8.count)\r\n\r\n" + element,
            "POST /v1/txn HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                + "2e\r\n" + #"{"ops":[{"op":"put","path":"/a","value":"x"}]}"# + "\r\n0\r\n\r\n",
            #"[{"op":"recv","path":"/X00000000000000a1/c"},{"op":"default"}]"#,
        ].map { Array($0.utf8) }
        func wireFrames(_ requests: [Wire.Request], _ answers: [Wire.Answer]) -> [UInt8] {
            var buffer = ByteBuffer()
            for r in requests { Wire.write(r, to: &buffer) }
            for a in answers { Wire.write(a, to: &buffer) }
            return [5] + Array(buffer.readableBytesView)
        }
        let wire: [[UInt8]] = [
            wireFrames(
                [Wire.Request(id: 1, .get(path: "/records/a", stale: false)),
                 Wire.Request(id: 2, .put(path: "/a", value: Array("v".utf8), session: 0)),
                 Wire.Request(id: 3, .create(path: "/q/item-", value: [1], session: 4, sequential: true))],
                []),
            wireFrames(
                [Wire.Request(id: 4, .compareAndSet(path: "/a", version: 2, value: [])), Wire.Request(id: 5, .delete(path: "/a", version: 3))],
                [Wire.Answer(id: 1, .record(Wire.Record(value: [1], version: 1, createRevision: 2, modRevision: 3, session: 0, revision: 4))),
                 Wire.Answer(id: 2, .written(WriteView(revision: 5, path: "/records/a", version: 2, session: 0))),
                 Wire.Answer(id: 0, .failed(APIError(status: 413, code: "too_large", message: "a frame")))]),
        ]
        return ["command": commands, "peer-frame": peer, "http-request": http, "wire": wire]
    }
}
