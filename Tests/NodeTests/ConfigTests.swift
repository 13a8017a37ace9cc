import CircuitNode
import CircuitTestSupport
import Foundation
import Testing

@Suite("Node configuration")
struct ConfigTests {
    /// The repository's `config/` folder.
    private var samples: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("config").path
    }

    @Test("the sample configs parse and validate")
    func samplesParse() throws {
        let single = try NodeConfig(tomlFile: "\(samples)/single-node.toml")
        #expect(single.data == "/tmp/circuit-single" && single.clientListen == "127.0.0.1:7700" && single.bootstrap.isEmpty)
        try single.validate()
        let three = try NodeConfig(tomlFile: "\(samples)/three-voters.toml")
        #expect(three.bootstrap.count == 3 && three.advertisedPeer == "10.0.0.1:7701")
        try three.validate()
        #expect(three.security == "mutual TLS" && three.tlsCert == "/etc/circuit/tls/X0000000000000a01.pem")
        #expect(try three.bootstrapVoters().map(\.host) == ["X0000000000000a01", "X0000000000000a02", "X0000000000000a03"])
    }

    @Test("a bad setting is an error naming it")
    func badSettings() throws {
        let dir = try temporaryFolder("config")
        func error(_ toml: String) -> String? {
            try? toml.write(toFile: "\(dir)/c.toml", atomically: true, encoding: .utf8)
            do {
                try NodeConfig(tomlFile: "\(dir)/c.toml").validate()
                return nil
            } catch {
                return "\(error)"
            }
        }
        #expect(error("data = \"/x\"\n") == nil)
        let unknown = error("dta = \"/x\"\n")
        #expect(unknown?.contains("unknown setting \"dta\"") == true, "\(unknown ?? "no error")")
        #expect(error("peer-listen = \"nohost\"\n")?.contains("peer-listen") == true)
        #expect(error("bootstrap = [\"Xnothex@127.0.0.1:1\"]\n")?.contains("Xnothex") == true)
        #expect(error("session-ttl-ms = \"soon\"\n") != nil)
        let role = error("join-as = \"boss\"\n")
        #expect(role?.contains("join-as: \"boss\" is neither learner nor worker") == true, "\(role ?? "no error")")
        #expect(error("join-as = \"worker\"\nvoter-replace-after-ms = 0\n") == nil)
        #expect(error("mount = 3\n") != nil)
        try "mount = \"/circuit\"\n".write(toFile: "\(dir)/m.toml", atomically: true, encoding: .utf8)
        #expect(try NodeConfig(tomlFile: "\(dir)/m.toml").mount == "/circuit")
        #expect(NodeConfig().mount == nil, "no mount unless asked for")
        #expect(NodeConfig().mountAllowOther == false, "a mount is its owner's alone unless asked")
        let limits = error("max-watches-per-client = 0\n")
        #expect(limits?.contains("max-watches-per-client must be at least 1, not 0") == true, "\(limits ?? "no error")")
        try "max-sessions-per-client = 5\nmax-streams-per-client = 7\nmount-allow-other = true\n"
            .write(toFile: "\(dir)/l.toml", atomically: true, encoding: .utf8)
        let limited = try NodeConfig(tomlFile: "\(dir)/l.toml")
        #expect(limited.maxSessionsPerClient == 5 && limited.maxStreamsPerClient == 7 && limited.maxWatchesPerClient == 256)
        #expect(limited.mountAllowOther)
        let huge = error("max-message-bytes = 4294967295\nmax-buffered-bytes = 8589934592\n")
        #expect(huge?.contains("max-message-bytes must be at most 1073741824 (1 GiB), not 4294967295") == true, "\(huge ?? "no error")")
        #expect(error("max-message-bytes = 1073741824\nmax-buffered-bytes = 2147483648\n") == nil)
        let snapshots = error("snapshot-entries = 10\n")
        #expect(snapshots?.contains("snapshot-entries must be at least 100, not 10") == true, "\(snapshots ?? "no error")")
        try "snapshot-entries = 5000\n".write(toFile: "\(dir)/s.toml", atomically: true, encoding: .utf8)
        #expect(try NodeConfig(tomlFile: "\(dir)/s.toml").snapshotEntries == 5000)
        #expect(NodeConfig().snapshotEntries == 20_000)
        #expect(NodeConfig().asyncStorageWrites)
        try "async-storage-writes = false\n".write(toFile: "\(dir)/w.toml", atomically: true, encoding: .utf8)
        #expect(try NodeConfig(tomlFile: "\(dir)/w.toml").asyncStorageWrites == false)
        let half = error("mount-tls-cert = \"/m.pem\"\n")
        #expect(half?.contains("mount-tls-cert and mount-tls-key go together") == true, "\(half ?? "no error")")
        let plain = error("mount-tls-cert = \"/m.pem\"\nmount-tls-key = \"/m.key\"\n")
        #expect(plain?.contains("mount-tls-cert needs TLS") == true, "\(plain ?? "no error")")
    }

    @Test("a data folder keeps its host id, and only one daemon may hold it")
    func dataFolder() throws {
        let dir = try temporaryFolder("folder")
        let a = try DataFolder(path: dir)
        #expect(HostID.isValid(a.hostID))
        #expect(try DataFolder(path: dir).hostID == a.hostID, "stable across opens")
        #expect(HostID.string(a.nodeID) == a.hostID)
        let lock = try a.lock()
        #expect(throws: DataFolderError.self) { _ = try DataFolder(path: dir).lock() }
        withExtendedLifetime(lock) {}
    }
}
