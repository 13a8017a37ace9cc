import ArgumentParser
import CircuitAPI
import CircuitClient
import CircuitSecurity
import Foundation

/// `circuit token`: join tokens, with which a new host gets its certificate from the cluster as it joins.
struct TokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token", abstract: "Join tokens: a new host joins with one instead of a certificate issued beforehand.",
        discussion: """
            A member started with the CA's key (--tls-ca-key) creates a token for an admin; the new host then runs \
            `circuit join ADDRESS --token TOKEN --tls-dir DIR`: it checks the cluster's CA against the token, and \
            the cluster issues its certificate (the host role) in the join exchange. A token is a secret until it \
            expires: whoever holds it can have a member's certificate issued.
            """,
        subcommands: [TokenCreate.self])
}

struct TokenCreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Create a join token (needs the admin role); prints it and when it expires.")
    @OptionGroup var options: ClientOptions
    @Option(help: "How long the token is accepted: seconds, or a number with s, m, h or d (at most 7d).")
    var ttl: String = "1h"

    func validate() throws {
        guard let seconds = Self.seconds(ttl), JoinToken.ttlRange.contains(seconds) else {
            throw ValidationError("--ttl \(ttl) is not a duration of 1 s to 7 d, such as 600, 15m, 1h or 2d")
        }
    }

    func run() async throws {
        let answer = try await options.client.createToken(ttlSeconds: Self.seconds(ttl) ?? 3600)
        let formatter = ISO8601DateFormatter()
        let expires = formatter.string(from: Date(timeIntervalSince1970: TimeInterval(answer.expires)))
        try options.emit(answer) { "\(answer.token)\nexpires \(expires)" }
    }

    /// `600`, `600s`, `15m`, `1h`, `2d` in seconds; nil if it is none of these.
    static func seconds(_ text: String) -> Int? {
        let units: [Character: Int] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        var number = Substring(text)
        var unit = 1
        if let last = text.last, let scale = units[last] {
            number = text.dropLast()
            unit = scale
        }
        guard !number.isEmpty, number.allSatisfy({ $0.isASCII && $0.isNumber }), let value = Int(number),
            value <= Int.max / unit
        else { return nil }
        return value * unit
    }
}
