/// The shape a JSON body may have before it is decoded: nesting at most `maxDepth` arrays and objects deep. Every
/// body of the API is a flat object or a list of them; a deeper one is refused with its depth named, before a
/// decoder spends time (or stack) on it. Size is limited where the body is read (`HTTPAPI.maxBody`).
public enum JSONLimits {
    public static let maxDepth = 32

    /// nil if `bytes` nests no deeper than `maxDepth`; otherwise why not. Strings (and escapes in them) are skipped;
    /// whether the rest is JSON is the decoder's to say.
    public static func depthProblem(_ bytes: some Sequence<UInt8>, maxDepth: Int = maxDepth) -> String? {
        var depth = 0
        var inString = false
        var escaped = false
        for byte in bytes {
            if inString {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            switch byte {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                depth += 1
                if depth > maxDepth { return "the JSON nests deeper than \(maxDepth) arrays and objects" }
            case UInt8(ascii: "]"), UInt8(ascii: "}"): depth -= 1
            default: break
            }
        }
        return nil
    }
}
