// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Circuit",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "CircuitRaft", targets: ["CircuitRaft"]),
        .library(name: "CircuitTransport", targets: ["CircuitTransport"]),
        .library(name: "CircuitStateMachine", targets: ["CircuitStateMachine"]),
        .library(name: "CircuitNode", targets: ["CircuitNode"]),
        .library(name: "CircuitClient", targets: ["CircuitClient", "CircuitAPI"]),
        .executable(name: "circuit", targets: ["CircuitCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.3.0"),
    ],
    targets: [
        // libsqlite3 from the system (Debian: libsqlite3-dev).
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        // The Raft protocol as a pure value type, its SQLite log store, and the thread shell that drives it.
        // Knows nothing of circuits.
        .target(
            name: "CircuitRaft",
            dependencies: [
                "CSQLite",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The replicated control state: hosts, sessions, the namespace, records, watches. Deterministic; knows
        // nothing of Raft or sockets.
        .target(name: "CircuitStateMachine"),
        // Who may talk to whom: the cluster's CA, certificates carrying roles, TLS contexts from PEM files.
        // Knows nothing of Raft or circuits.
        .target(
            name: "CircuitSecurity",
            dependencies: [
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Raft between daemons over TCP (SwiftNIO): framing, the binary codec, the handshake, reconnection.
        .target(
            name: "CircuitTransport",
            dependencies: [
                "CircuitRaft",
                "CircuitSecurity",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The daemon's parts: the replicated control state over Raft, the node's services and APIs.
        .target(
            name: "CircuitNode",
            dependencies: [
                "CMalloc",
                "CircuitRaft",
                "CircuitStateMachine",
                "CircuitTransport",
                "CircuitAPI",
                "CircuitClient",
                "CircuitFS",
                "CircuitSecurity",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // libfuse3 from the system (Debian: libfuse3-dev), with a shim for what its header writes as macros.
        .systemLibrary(
            name: "CFuse3",
            pkgConfig: "fuse3",
            providers: [.apt(["libfuse3-dev"])]
        ),
        // The file-system interface (`circuit mount`): the slides' layout over the client library, served through
        // libfuse's low-level API.
        .target(
            name: "CircuitFS",
            dependencies: [
                "CFuse3",
                "CircuitAPI",
                "CircuitClient",
                "CircuitSecurity",
                "CircuitStateMachine",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // The wire types of the HTTP/JSON API, shared by the daemon and its clients.
        .target(name: "CircuitAPI"),
        // The Swift client library: async calls to a cluster's HTTP/JSON API.
        .target(
            name: "CircuitClient",
            dependencies: [
                "CircuitAPI",
                "CircuitSecurity",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // What the fuzzers feed bytes to: the command codec and state machine, the peer framing, the HTTP parser and
        // the API's JSON bodies. `circuit-fuzz` is their libFuzzer entry point (scripts/fuzz) or a replay of files.
        .target(
            name: "CircuitFuzzing",
            dependencies: [
                "CircuitAPI",
                "CircuitClient",
                "CircuitRaft",
                "CircuitStateMachine",
                "CircuitTransport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // glibc's allocator settings (mallopt): the daemon's and the client verbs' policy for large messages.
        .systemLibrary(name: "CMalloc"),
        // The `circuit` executable's standard streams, held open from its start (a C constructor).
        .target(name: "CStandardStreams"),
        .executableTarget(name: "circuit-fuzz", dependencies: ["CircuitFuzzing"]),
        // Helpers shared by the test targets (not a product).
        .target(name: "CircuitTestSupport"),
        // The `circuit` command: for now the in-process demonstration cluster and the Raft benchmark.
        .executableTarget(
            name: "CircuitCLI",
            dependencies: [
                "CStandardStreams",
                "CircuitSecurity",
                "CircuitFS",
                "CircuitRaft",
                "CircuitStateMachine",
                "CircuitNode",
                "CircuitClient",
                "CircuitAPI",
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "RaftTests",
            dependencies: [
                "CircuitRaft",
                "CircuitTestSupport",
                "CircuitCLI",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "TransportTests",
            dependencies: [
                "CircuitTransport",
                "CircuitSecurity",
                "CircuitTestSupport",
                "CircuitRaft",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The linearizability checker and the chaos suite on real daemons.
        .testTarget(
            name: "ChaosTests",
            dependencies: ["CircuitNode", "CircuitClient", "CircuitAPI", "CircuitStateMachine", "CircuitTestSupport"]
        ),
        .testTarget(
            name: "NodeTests",
            dependencies: [
                "CircuitFS",
                .product(name: "Hummingbird", package: "hummingbird"),
                "CircuitFuzzing",
                "CircuitSecurity",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                "CircuitNode",
                "CircuitClient",
                "CircuitAPI",
                "CircuitRaft",
                "CircuitStateMachine",
                "CircuitTestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "StateMachineTests",
            dependencies: [
                "CircuitStateMachine",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
