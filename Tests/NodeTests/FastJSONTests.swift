import CircuitAPI
import Foundation
import NIOCore
import Testing

@testable import CircuitNode

@Suite("Answers written as JSON by hand")
struct FastJSONTests {
    /// Every ASCII control character, quotes, backslashes, slashes, and text beyond ASCII.
    static let awkward: [String] = [
        "", "plain", "/records/a/b", "quote \" and backslash \\ and slash /",
        String(decoding: (0..<32).map { UInt8($0) }, as: UTF8.self), "tab\tnewline\nreturn\r\u{7F}",
        "é, 水, 🦀 and \u{2028}", String(repeating: "x", count: 5000),
    ]

    @Test("a record read's answer decodes to the view it was written from, for any text", arguments: awkward)
    func records(_ text: String) throws {
        let view = RecordView(
            path: "/records/\(text.prefix(20))", value: text, valueBase64: Data(text.utf8).base64EncodedString(),
            version: 3, createRevision: 1, modRevision: UInt64.max, session: 0, revision: 12_345_678_901)
        let bytes = Data(view.jsonBuffer.readableBytesView)
        #expect(try JSONDecoder().decode(RecordView.self, from: bytes) == view)
        #expect(try JSONSerialization.jsonObject(with: bytes) is [String: Any], "strict JSON")
    }

    @Test("the same bytes as JSONEncoder with sorted keys (and slashes unescaped) for plain text; nil fields left out")
    func sameAsEncoder() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let record = RecordView(
            path: "/records/k", value: "v 1", valueBase64: "diAx", version: 2, createRevision: 5, modRevision: 9, session: 77,
            revision: 10)
        #expect(Array(record.jsonBuffer.readableBytesView) == Array(try encoder.encode(record)))
        for write in [WriteView(revision: 4, path: "/records/s/000001", version: 1, session: 0), WriteView(revision: 4, path: nil, version: 0, session: 9)] {
            #expect(Array(write.jsonBuffer.readableBytesView) == Array(try encoder.encode(write)))
        }
    }

    @Test("control characters are escaped as JSON requires")
    func escapes() {
        let view = WriteView(revision: 1, path: "a\"b\\c\n\u{1}", version: 0, session: 0)
        #expect(String(buffer: view.jsonBuffer) == #"{"path":"a\"b\\c\n\u0001","revision":1,"session":0,"version":0}"#)
    }
}
