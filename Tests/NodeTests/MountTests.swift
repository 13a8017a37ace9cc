import CircuitFS
import CircuitNode
import CircuitSecurity
import CircuitTestSupport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

// MARK: - The layout and the inode table, with no mount

@Suite("The mount's layout and inodes")
struct MountLayoutTests {
    @Test("the layout's fixed names: hosts hold dc, sys and help; dc holds the three kinds; elements their files")
    func fixedNames() {
        let h = "X0123456789abcdef"
        #expect(FSNode.root.fixedChild("help") == .rootHelp)
        #expect(FSNode.host(h).fixedChild("dc") == .dc(h))
        #expect(FSNode.host(h).fixedChild("sys") == .sys(h))
        #expect(FSNode.host(h).fixedChild("nope") == nil)
        #expect(FSNode.dc(h).fixedChild("chan") == .kindDir(h, .chan))
        #expect(FSNode.dc(h).fixedChild("records") == nil)
        #expect(FSNode.sys(h).fixedChild("cpus") == .sysFile(h, "cpus"))
        #expect(FSNode.element(h, .proc, "p").fixedChild("waitexit") == .elementFile(h, .proc, "p", "waitexit"))
        #expect(FSNode.element(h, .chan, "c").fixedChild("waitexit") == nil)
        #expect(FSNode.element(h, .chan, "c").fixedChild("trysend") == .elementFile(h, .chan, "c", "trysend"))
        #expect(FSNode.elementFile(h, .chan, "c", "recv").elementPath == "/\(h)/c")
        #expect(FSNode.isHostName(h))
        #expect(!FSNode.isHostName("X0123456789ABCDEF"))  // host ids are lowercase
        #expect(!FSNode.isHostName("records"))
        // The slides' files, with their modes.
        #expect(ElementKind.proc.files.map(\.name) == ["env", "error", "help", "run", "signal", "stat", "stderr", "stdin", "stdout", "waitexit"])
        #expect(ElementKind.chan.mode(of: "send") == 0o222)
        #expect(ElementKind.chan.mode(of: "cap") == 0o666)
        #expect(FSNode.elementFile(h, .proc, "p", "stdin").permissions == 0o222)
        #expect(FSNode.kindDir(h, .proc).isDirectory && !FSNode.record("/records/a").isDirectory)
    }

    @Test("an inode lives while the kernel holds a lookup of it; the root is never forgotten; numbers are not reused")
    func inodes() {
        var table = InodeTable()
        #expect(table.node(InodeTable.rootInode) == .root)
        let a = table.lookUp(.host("X0123456789abcdef"))
        #expect(table.lookUp(.host("X0123456789abcdef")) == a)  // two lookups held
        let b = table.lookUp(.rootHelp)
        #expect(a != b && a != InodeTable.rootInode)
        table.forget(a, count: 1)
        #expect(table.node(a) == .host("X0123456789abcdef"))
        table.forget(a, count: 1)
        #expect(table.node(a) == nil)
        #expect(table.existing(.host("X0123456789abcdef")) == nil)
        let c = table.lookUp(.host("X0123456789abcdef"))
        #expect(c != a)  // a new number: the kernel may still name the old one in a late forget
        table.forget(InodeTable.rootInode, count: 100)
        #expect(table.node(InodeTable.rootInode) == .root)
        table.forget(999, count: 1)  // unknown: ignored
        #expect(table.count == 3)
    }

    @Test("API errors map to errno")
    func errnos() {
        let cases: [(String, Int32)] = [
            ("exists", EEXIST), ("not_found", ENOENT), ("invalid_name", EINVAL), ("malformed_command", EINVAL),
            ("would_block", EAGAIN), ("host_not_alive", EHOSTDOWN), ("closed", EPIPE), ("too_large", EFBIG),
            ("busy", EBUSY), ("not_running", ESRCH), ("forbidden", EACCES), ("too_many_watches", EUSERS),
            ("something_new", EIO),
        ]
        for (code, errno) in cases { #expect(FSError.errno(forCode: code) == errno, "\(code)") }
    }
}

// MARK: - Real mounts on real daemons

/// Whether FUSE mounts can be made here.
let fuseAvailable: Bool = {
    let fd = open("/dev/fuse", O_RDWR)
    if fd < 0 { return false }
    close(fd)
    return true
}()

/// A bash script's exit status and output; the script is killed (and this throws) after `timeout`. Started with
/// signals at their defaults and none blocked (a child of the test process would inherit its blocked signals, and
/// `timeout` could not stop it).
@discardableResult
func sh(_ script: String, timeout: Duration = .seconds(30)) async throws -> (status: Int32, out: String, err: String) {
    let dir = try temporaryFolder("sh")
    let input = open("/dev/null", O_RDONLY)
    let output = open("\(dir)/out", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    let error = open("\(dir)/err", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    let pid: pid_t
    do {
        defer { for fd in [input, output, error] { close(fd) } }
        pid = try spawnClean("/bin/bash", ["-c", script], stdio: (input, output, error))
    }
    var status: Int32 = 0
    do {
        try await eventually("the script to end: \(script)", timeout: timeout) { waitpid(pid, &status, WNOHANG) == pid }
    } catch {
        kill(-pid, SIGKILL)
        _ = waitpid(pid, &status, 0)
        throw error
    }
    let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return (code, try String(contentsOfFile: "\(dir)/out", encoding: .utf8), try String(contentsOfFile: "\(dir)/err", encoding: .utf8))
}

/// Whether `dir` is a mount point now.
func isMounted(_ dir: String) -> Bool {
    let mounts = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
    return mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == dir }
}

/// `circuit mount DIR` through the API at `node`, started; its log goes to `log` (default: nowhere).
func startMount(_ dir: String, node: String, log: String? = nil) throws -> Process {
    let mount = Process()
    mount.executableURL = URL(fileURLWithPath: try #require(circuitBinary()))
    mount.arguments = ["mount", dir, "--node", node]
    if let log { _ = FileManager.default.createFile(atPath: log, contents: nil) }
    mount.standardError = log.flatMap { FileHandle(forWritingAtPath: $0) } ?? FileHandle.nullDevice
    mount.standardOutput = FileHandle.nullDevice
    try mount.run()
    return mount
}

/// `circuit mount DIR` through the API at `node` with the client identity `tls` and more `arguments`, started.
func startMount(_ dir: String, node: String, tls: TLSFiles, arguments: [String]) throws -> Process {
    let mount = Process()
    mount.executableURL = URL(fileURLWithPath: try #require(circuitBinary()))
    mount.arguments =
        ["mount", dir, "--node", node, "--tls-ca", tls.caPath, "--tls-cert", tls.certificatePath, "--tls-key", tls.keyPath]
        + arguments
    mount.standardError = FileHandle.nullDevice
    mount.standardOutput = FileHandle.nullDevice
    try mount.run()
    return mount
}

/// Three daemons; member 2 mounts the cluster at its `mount` setting, and a `circuit mount` process mounts it through
/// member 0. Answers the cluster, the two mount points and the mount process.
func mountedCluster() async throws -> (DaemonProcesses, String, String, Process) {
    let binary = try #require(circuitBinary())
    let base = try temporaryFolder("mount")
    let cluster = try DaemonProcesses(binary: binary, base: base, count: 3, sessionTTLMillis: 1500)
    let viaCLI = "\(base)/m0", viaConfig = "\(base)/m2"
    cluster.mounts[2] = viaConfig
    try cluster.startAll()
    var mount: Process?
    do {
        _ = try await cluster.leader()
        _ = try await cluster.allAlive()
        mount = try startMount(viaCLI, node: cluster.members[0].api, log: "\(base)/mount.log")
        try await eventually("both mounts to list the three hosts", timeout: .seconds(20)) {
            for dir in [viaCLI, viaConfig] {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
                if names.filter(FSNode.isHostName).count != 3 { return false }
            }
            return true
        }
        return (cluster, viaCLI, viaConfig, try #require(mount))
    } catch {
        if let mount, mount.isRunning { kill(mount.processIdentifier, SIGKILL) }
        cluster.stopAll(signal: SIGKILL)
        for dir in [viaCLI, viaConfig] { umount2(dir, Int32(MNT_DETACH)) }
        throw error
    }
}

@Suite(
    "The file system, mounted for real", .serialized, .timeLimit(.minutes(3)),
    .enabled(if: fuseAvailable, "/dev/fuse cannot be opened here: the mount tests are skipped"))
struct MountTests {
    @Test("the slides' sequences through two mounts on two daemons: processes with run, waitexit, stdin and stdout; channels with cap, send and recv across hosts; a select's wait; records; sys and help; every error case's errno and error text")
    func slides() async throws {
        let (cluster, m1, m2, mount) = try await mountedCluster()
        defer {
            kill(mount.processIdentifier, SIGTERM)
            mount.waitUntilExit()
            cluster.stopAll()
            for dir in [m1, m2] { umount2(dir, Int32(MNT_DETACH)) }
        }
        let a = cluster.members[0].folder.hostID, b = cluster.members[1].folder.hostID
        let tmp = try temporaryFolder("mount-out")

        // The root lists the live hosts, records/ and help; a host holds dc/, sys/ and help.
        let root = try await sh("ls \(m1)")
        #expect(root.out.split(separator: "\n").count == 5, "\(root)")
        #expect(try await sh("ls \(m1)/\(b)").out == "dc\nhelp\nsys\n")
        #expect(try await sh("ls \(m1)/\(b)/dc").out == "chan\nhelp\nproc\nselect\n")
        let cpus = try await sh("cat \(m2)/\(b)/sys/cpus")
        #expect(Int(cpus.out.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0 >= 1, "\(cpus)")
        let raft = try await sh("cat \(m2)/\(b)/sys/raft")
        #expect(raft.out.hasPrefix("leader ") || raft.out.hasPrefix("follower "), "\(raft)")
        #expect(try await sh("cat \(m1)/help \(m1)/\(b)/help \(m1)/\(b)/dc/help").out.contains("mkdir"))

        // mkdir takes the name through Raft: the other mount sees it at once, as reserved, and cannot take it too.
        let reserved = try await sh(
            """
            mkdir \(m1)/\(b)/dc/chan/seen && ls \(m2)/\(b)/dc/chan && cat \(m2)/\(b)/dc/chan/seen/stat &&
            mkdir \(m2)/\(b)/dc/proc/seen
            """)
        #expect(reserved.out.hasPrefix("seen\n") && reserved.out.contains("\"reserves\" : \"chan\""), "\(reserved)")
        #expect(reserved.status != 0 && reserved.err.contains("File exists"), "\(reserved)")
        #expect(try await sh("rmdir \(m2)/\(b)/dc/chan/seen && ls \(m1)/\(b)/dc/chan").out == "")

        // Process (slides): mkdir pippi; the run JSON for /bin/ls -a /; cat waitexit; seen from the other mount.
        let pippi = try await sh(
            """
            cd \(m1)/\(b)/dc/proc && mkdir pippi && cd pippi && ls && cat help > /dev/null &&
            printf '{\\n "env": ["TERM=circuit"],\\n "path": "/bin/ls",\\n "args": ["-a", "/"]\\n}\\n' >> run &&
            cat waitexit > \(tmp)/waitexit && cat stdout
            """)
        #expect(pippi.status == 0, "\(pippi)")
        #expect(pippi.out.hasPrefix("env\nerror\nhelp\nrun\nsignal\nstat\nstderr\nstdin\nstdout\nwaitexit\n"), "\(pippi)")
        #expect(pippi.out.contains("\n..\n") && pippi.out.contains("\ntmp\n"), "ls -a / printed its listing: \(pippi.out)")
        let exit = try String(contentsOfFile: "\(tmp)/waitexit", encoding: .utf8)
        #expect(exit.contains("\"phase\" : \"exited\"") && exit.contains("\"exit_code\" : 0"), "\(exit)")
        let seen = try await sh("cat \(m2)/\(b)/dc/proc/pippi/stat; cat \(m2)/\(b)/dc/proc/pippi/env")
        #expect(seen.out.contains("\"phase\" : \"exited\"") && seen.out.hasSuffix("TERM=circuit\n"), "\(seen)")

        // Process (slides): yes >> stdin & and cat stdout, through a process that takes a million bytes.
        let piped = try await sh(
            """
            cd \(m1)/\(b)/dc/proc && mkdir taker && cd taker &&
            echo '{"path": "/usr/bin/head", "args": ["-c", "1000000"]}' > run &&
            (yes >> stdin 2>/dev/null &) && cat stdout | wc -c && cat waitexit
            """, timeout: .seconds(60))
        #expect(piped.status == 0, "\(piped)")
        #expect(piped.out.hasPrefix("1000000\n") && piped.out.contains("\"phase\" : \"exited\""), "\(piped)")

        // Channel (slides): mkdir charlie; echo 0 >> cap; "Hello, world!" sent through one mount, received through
        // the other, on a third host.
        let charlie = try await sh(
            """
            cd \(m1)/\(b)/dc/chan && mkdir charlie && cd charlie && echo 0 >> cap && cat cap &&
            (cat \(m2)/\(b)/dc/chan/charlie/recv > \(tmp)/got &) &&
            echo "Hello, world!" >> send && cat stat
            """)
        #expect(charlie.status == 0, "\(charlie)")
        #expect(charlie.out.hasPrefix("0\n") && charlie.out.contains("\"sends\" : 1"), "\(charlie)")
        try await eventually("the receiver to have the message") {
            (try? String(contentsOfFile: "\(tmp)/got", encoding: .utf8)) == "Hello, world!\n"
        }

        // A read blocked on one mount holds up nothing else on that mount.
        let blocked = try await sh(
            """
            cd \(m1)/\(b)/dc/chan && mkdir waiting && echo 0 > waiting/cap &&
            (cat waiting/recv > \(tmp)/waiting &) && until grep -q '"waiting_receivers" : 1' waiting/stat; do sleep 0.02; done &&
            ls \(m1)/\(b)/dc/chan > /dev/null && cat \(m1)/\(b)/sys/cpus > /dev/null && cat \(m1)/help > /dev/null &&
            echo released > waiting/send
            """)
        #expect(blocked.status == 0, "\(blocked)")
        try await eventually("the blocked reader to get its message") {
            (try? String(contentsOfFile: "\(tmp)/waiting", encoding: .utf8)) == "released\n"
        }

        // A select on host A over two channels on host B: wait reports the clause that fired; message gives its bytes.
        let select = try await sh(
            """
            cd \(m1)/\(b)/dc/chan && mkdir left right && echo 0 > left/cap && echo 1 > right/cap &&
            cd \(m1)/\(a)/dc/select && mkdir sarah && cd sarah && ls &&
            printf '[{"op": "recv", "chan": "/\(b)/left"}, {"op": "recv", "chan": "/\(b)/right"}]' > select &&
            (cat wait > \(tmp)/wait &) && echo hola >> \(m2)/\(b)/dc/chan/right/send
            """)
        #expect(select.status == 0, "\(select)")
        #expect(select.out == "abort\nerror\nhelp\nmessage\nselect\nwait\n", "\(select)")
        try await eventually("the select to fire") {
            ((try? String(contentsOfFile: "\(tmp)/wait", encoding: .utf8)) ?? "").contains("\"clause\" : 1")
        }
        #expect(try await sh("cat \(m1)/\(a)/dc/select/sarah/message").out == "hola\n")

        // abort removes the select; close closes a channel (a receive on it, closed and empty, fails with EPIPE);
        // a process's stderr.
        #expect(try await sh("echo x > \(m1)/\(a)/dc/select/sarah/abort && ls \(m2)/\(a)/dc/select").out == "")
        let closing = try await sh(
            """
            cd \(m1)/\(b)/dc/chan && mkdir closing && echo 1 > closing/cap && echo last > closing/send &&
            echo close >> closing/close && cat closing/recv && grep '"closed" : true' closing/stat && cat closing/recv
            """)
        #expect(closing.out.hasPrefix("last\n") && closing.out.contains("closed"), "\(closing)")
        #expect(closing.status != 0 && closing.err.contains("Broken pipe"), "\(closing)")
        let stderr = try await sh(
            """
            cd \(m1)/\(b)/dc/proc && mkdir oops && echo '{"path": "/bin/sh", "args": ["-c", "echo oops >&2"]}' > oops/run &&
            cat oops/stderr && cat oops/stdout
            """)
        #expect(stderr.status == 0 && stderr.out == "oops\n", "\(stderr)")

        // Records: a file per record, a directory per segment; written through one mount, read through the other.
        let records = try await sh("mkdir -p \(m1)/records/app && echo one > \(m1)/records/app/cfg && cat \(m2)/records/app/cfg")
        #expect(records.out == "one\n", "\(records)")
        #expect(try await sh("ls \(m2)/records; ls \(m2)/records/app").out == "app\ncfg\n")
        #expect(try await sh("rm \(m2)/records/app/cfg && ls \(m2)/records").out == "")

        // Error cases: errno as the shell reports it, and the element's error file in words.
        let dc = "\(m1)/\(b)/dc"
        let errors: [(script: String, errno: String, element: String?, error: String?)] = [
            ("mkdir \(dc)/chan/charlie", "File exists", nil, nil),
            ("mkdir \(dc)/proc/charlie", "File exists", nil, nil),  // one namespace per host
            ("mkdir '\(dc)/proc/a b'", "Invalid argument", nil, nil),
            ("mkdir \(dc)/proc/bad && printf '{\"path\": 3}' > \(dc)/proc/bad/run", "Invalid argument", "proc/bad", "not a command in JSON"),
            // Incomplete JSON fails only at close, which echo ignores: the error file says it.
            ("printf '{\"path\": \"/bin/true\", \"args\": [' > \(dc)/proc/bad/run; cat \(dc)/proc/bad/error >&2", "not valid JSON", nil, nil),
            ("cat \(dc)/chan/charlie/tryrecv", "Resource temporarily unavailable", "chan/charlie", "holds no message"),
            ("echo x > \(dc)/chan/charlie/trysend", "Resource temporarily unavailable", "chan/charlie", "no waiting receiver"),
            ("echo 3 > \(dc)/chan/charlie/cap", "Device or resource busy", "chan/charlie", "already set"),
            ("mkdir \(dc)/chan/nocap && echo x > \(dc)/chan/nocap/trysend", "Invalid argument", "chan/nocap", "write cap first"),
            ("mkdir \(dc)/proc/sleeper && echo '{\"path\": \"/bin/sleep\", \"args\": [\"60\"]}' > \(dc)/proc/sleeper/run && rmdir \(dc)/proc/sleeper",
             "Device or resource busy", "proc/sleeper", "signal it first"),  // pending or running
            ("echo NOPE > \(dc)/proc/sleeper/signal", "Invalid argument", "proc/sleeper", "unknown signal"),
            ("mkdir \(dc)/chan/wordy && echo many > \(dc)/chan/wordy/cap", "Invalid argument", "chan/wordy", "is not a capacity"),
            ("mkdir \(m1)/\(b)/dc/select/sel && echo '{\"op\": \"recv\"}' > \(m1)/\(b)/dc/select/sel/select", "Invalid argument",
             "select/sel", "not a JSON array of clauses"),
            ("cat \(dc)/proc/pippi/../../chan/nocap/recv", "Invalid argument", "chan/nocap", "write cap first"),
            ("ls \(m1)/X0000000000000000", "No such file or directory", nil, nil),
            ("ls \(dc)/proc/nothing", "No such file or directory", nil, nil),
            ("echo x > \(dc)/proc/pippi/stdout", "Permission denied", nil, nil),
        ]
        for e in errors {
            let r = try await sh(e.script)
            #expect(r.err.contains(e.errno), "\(e.script) → \(r)")
            if let element = e.element, let text = e.error {
                let file = try await sh("cat \(dc)/\(element)/error")
                #expect(file.out.contains(text), "\(e.script): the error file says \(file.out)")
            }
        }

        // A signal, then rmdir of the ended process; an element removed through one mount is gone from the other.
        let ended = try await sh(
            """
            cd \(m1)/\(b)/dc/proc/sleeper && until grep -q '"phase" : "running"' stat; do sleep 0.02; done &&
            echo KILL > signal && cat waitexit && cd .. && rmdir sleeper && ls \(m2)/\(b)/dc/proc
            """)
        #expect(ended.status == 0 && ended.out.contains("\"signal\" : 9"), "\(ended)")
        #expect(!ended.out.contains("sleeper\n"), "\(ended)")

        // The daemon that mounts (the config's `mount`) unmounts when it stops gracefully, with a reader blocked.
        let stuck = Task { try await sh("cat \(m2)/\(b)/dc/chan/waiting/recv", timeout: .seconds(30)) }
        try await eventually("the reader to wait") {
            ((try? await sh("cat \(m1)/\(b)/dc/chan/waiting/stat").out) ?? "").contains("\"waiting_receivers\" : 1")
        }
        guard let daemon = cluster.members[2].process else { return }
        kill(daemon.processIdentifier, SIGTERM)
        let interrupted = try await stuck.value
        #expect(interrupted.status != 0, "the blocked reader was answered: \(interrupted)")
        try await eventually("the daemon to stop", timeout: .seconds(20)) { !daemon.isRunning }
        #expect(!isMounted(m2), "the daemon's mount is gone")
    }

    @Test("a mount is its owner's alone unless allowed (other users refused, the modes without group and other bits); a daemon's mount acts with the identity it is given: a reader's lists and reads and cannot make")
    func ownerAndIdentity() async throws {
        let binary = try #require(circuitBinary())
        let base = try temporaryFolder("mount-tls")
        let cluster = try DaemonProcesses(binary: binary, base: base, count: 3, sessionTTLMillis: loadedMachineTTL)
        try cluster.enableTLS()
        let reader = try cluster.issueClient("mount-reader", roles: [.read])
        let own = "\(base)/own", shared = "\(base)/shared"
        cluster.mounts[2] = own
        cluster.extraArguments = ["--mount-tls-cert", reader.certificatePath, "--mount-tls-key", reader.keyPath]
        try cluster.startAll()
        var sharing: Process?
        defer {
            if let sharing, sharing.isRunning { kill(sharing.processIdentifier, SIGKILL) }
            cluster.stopAll(signal: SIGKILL)
            for dir in [own, shared] { umount2(dir, Int32(MNT_DETACH)) }
        }
        _ = try await cluster.leader()
        _ = try await cluster.allAlive()
        try await eventually("the daemon's mount to list the three hosts", timeout: .seconds(20)) {
            ((try? FileManager.default.contentsOfDirectory(atPath: own)) ?? []).filter(FSNode.isHostName).count == 3
        }
        let b = cluster.members[1].folder.hostID
        let nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups"

        // Its owner's alone: the kernel refuses another user, and the modes say so.
        let modes = try await sh("stat -c %a \(own) \(own)/help \(own)/\(b)/dc/chan")
        #expect(modes.out == "500\n400\n700\n", "\(modes)")
        let other = try await sh("\(nobody) ls \(own)")
        #expect(other.status != 0 && other.err.contains("Permission denied"), "\(other)")

        // The reader's identity: it lists and reads, and making a channel is refused (EACCES) by the cluster.
        #expect(try await sh("cat \(own)/\(b)/sys/cpus").status == 0)
        let made = try await sh("mkdir \(own)/\(b)/dc/chan/nope")
        #expect(made.status != 0 && made.err.contains("Permission denied"), "\(made)")

        // With --allow-other (and an identity that may write), another user may use it, and the modes are the
        // layout's own.
        let admin = try #require(cluster.tls)
        sharing = try startMount(shared, node: cluster.members[0].api, tls: admin, arguments: ["--allow-other"])
        try await eventually("the shared mount to list the three hosts", timeout: .seconds(20)) {
            ((try? FileManager.default.contentsOfDirectory(atPath: shared)) ?? []).filter(FSNode.isHostName).count == 3
        }
        #expect(try await sh("stat -c %a \(shared) \(shared)/\(b)/dc/chan").out == "555\n777\n")
        let together = try await sh("\(nobody) sh -c 'ls \(shared) > /dev/null && mkdir \(shared)/\(b)/dc/chan/shared && ls \(shared)/\(b)/dc/chan'")
        #expect(together.status == 0 && together.out == "shared\n", "\(together)")
    }

    @Test("SIGTERM unmounts cleanly; a mount left by a killed process is cleaned up by the next; a reader blocked on a host that dies fails with EIO, and a reader interrupted leaves no receiver behind")
    func lifecycle() async throws {
        let (cluster, m1, m2, mount) = try await mountedCluster()
        defer {
            if mount.isRunning { kill(mount.processIdentifier, SIGKILL) }
            cluster.stopAll(signal: SIGKILL)
            for dir in [m1, m2] { umount2(dir, Int32(MNT_DETACH)) }
        }
        let b = cluster.members[1].folder.hostID
        #expect(isMounted(m1) && isMounted(m2))

        // An interrupted read (the reader is killed) withdraws its receive: the next message goes to the next reader.
        #expect(try await sh("mkdir \(m1)/\(b)/dc/chan/c && echo 2 > \(m1)/\(b)/dc/chan/c/cap").status == 0)
        let interrupted = try await sh("timeout 1 cat \(m1)/\(b)/dc/chan/c/recv")
        #expect(interrupted.status == 124, "\(interrupted)")
        try await eventually("the receiver to be withdrawn") {
            let stat = (try? await sh("cat \(m2)/\(b)/dc/chan/c/stat").out) ?? ""
            return stat.contains("\"waiting_receivers\" : 0")
        }
        let next = try await sh("echo after > \(m1)/\(b)/dc/chan/c/send && cat \(m2)/\(b)/dc/chan/c/recv")
        #expect(next.out == "after\n", "\(next)")

        // SIGTERM: the mount process unmounts and exits 0.
        kill(mount.processIdentifier, SIGTERM)
        try await eventually("the mount process to exit", timeout: .seconds(10)) { !mount.isRunning }
        #expect(mount.terminationStatus == 0)
        #expect(!isMounted(m1))

        // kill -9 leaves a dead mount (ENOTCONN); the next mount detaches it and serves.
        let second = try startMount(m1, node: cluster.members[0].api)
        try await eventually("the second mount", timeout: .seconds(10)) {
            ((try? FileManager.default.contentsOfDirectory(atPath: m1)) ?? []).contains(b)
        }
        kill(second.processIdentifier, SIGKILL)
        try await onOwnThread { second.waitUntilExit() }
        let dead = try await sh("ls \(m1)")
        #expect(dead.err.contains("Transport endpoint is not connected"), "\(dead)")
        let third = try startMount(m1, node: cluster.members[0].api)
        defer {
            kill(third.processIdentifier, SIGTERM)
            third.waitUntilExit()
        }
        try await eventually("the mount after a stale one", timeout: .seconds(10)) {
            ((try? FileManager.default.contentsOfDirectory(atPath: m1)) ?? []).contains(b)
        }

        // A reader blocked on host B's channel fails with EIO when B is killed; B's directory goes once it expires.
        let reader = Task { try await sh("cat \(m1)/\(b)/dc/chan/c/recv", timeout: .seconds(30)) }
        try await eventually("the reader to wait at B") {
            ((try? await sh("cat \(m2)/\(b)/dc/chan/c/stat").out) ?? "").contains("\"waiting_receivers\" : 1")
        }
        cluster.kill9(1)
        let failed = try await reader.value
        #expect(failed.status != 0 && failed.err.contains("Input/output error"), "\(failed)")
        try await eventually("B to leave the listing", timeout: .seconds(20)) {
            !((try? FileManager.default.contentsOfDirectory(atPath: m2)) ?? [b]).contains(b)
        }
        // The kernel may keep the name a second longer.
        try await eventually("B's directory to be gone", timeout: .seconds(5)) {
            ((try? await sh("ls \(m2)/\(b)").err) ?? "").contains("No such file or directory")
        }
    }
}
