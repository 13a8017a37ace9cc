import CSQLite

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// SQLite's "copy the bytes now" destructor; a cast macro in C, so Swift does not import it.
private let SQLITE_TRANSIENT = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

/// An error from SQLite, with what we were doing when it happened.
public struct SQLiteError: Error, Sendable, CustomStringConvertible {
    public var code: Int32
    public var message: String
    public var context: String
    public var description: String { "SQLite error \(code) (\(message)) while \(context)" }
}

/// One SQLite connection with a single owner (opened with SQLITE_OPEN_NOMUTEX): not shared between threads at once.
final class SQLiteConnection {
    private(set) var handle: OpaquePointer?
    let path: String
    /// Every statement prepared here, finalized on `close` so that the file and its lock are released at once
    /// (`sqlite3_close_v2` otherwise keeps the connection alive while any statement remains).
    private var statements: [SQLiteStatement] = []

    init(path: String) throws(SQLiteError) {
        self.path = path
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            sqlite3_close_v2(db)
            throw SQLiteError(code: rc, message: message, context: "opening \(path)")
        }
        self.handle = db
    }

    deinit {
        close()
    }

    func close() {
        for statement in statements { statement.finalize() }
        statements.removeAll()
        if let handle {
            sqlite3_close_v2(handle)
            self.handle = nil
        }
    }

    func execute(_ sql: String) throws(SQLiteError) {
        var errmsg: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(handle, sql, nil, nil, &errmsg)
        if rc != SQLITE_OK {
            let message = errmsg.map { String(cString: $0) } ?? String(cString: sqlite3_errstr(rc))
            sqlite3_free(errmsg)
            throw SQLiteError(code: rc, message: message, context: "executing \(sql)")
        }
    }

    func prepare(_ sql: String) throws(SQLiteError) -> SQLiteStatement {
        var stmt: OpaquePointer?
        let rc = sqlite3_prepare_v3(handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &stmt, nil)
        guard rc == SQLITE_OK, let stmt else { throw error(rc, "preparing \(sql)") }
        let statement = SQLiteStatement(connection: self, stmt: stmt, sql: sql)
        statements.append(statement)
        return statement
    }

    /// A one-row, one-column text answer (for pragmas).
    func scalarText(_ sql: String) throws(SQLiteError) -> String? {
        let stmt = try prepare(sql)
        guard try stmt.step() else { return nil }
        defer { stmt.reset() }
        return stmt.text(0)
    }

    func error(_ rc: Int32, _ context: String) -> SQLiteError {
        SQLiteError(code: rc, message: String(cString: sqlite3_errmsg(handle)), context: context)
    }
}

/// A prepared statement, reset after each use.
final class SQLiteStatement {
    private unowned let connection: SQLiteConnection
    private var stmt: OpaquePointer?
    let sql: String

    fileprivate init(connection: SQLiteConnection, stmt: OpaquePointer, sql: String) {
        self.connection = connection
        self.stmt = stmt
        self.sql = sql
    }

    deinit {
        finalize()
    }

    func finalize() {
        if let stmt {
            sqlite3_finalize(stmt)
            self.stmt = nil
        }
    }

    func bind(_ values: SQLiteValue...) throws(SQLiteError) {
        try bind(values)
    }

    private func bind(_ values: [SQLiteValue]) throws(SQLiteError) {
        guard stmt != nil else {
            throw SQLiteError(code: SQLITE_MISUSE, message: "the connection is closed", context: "running \(sql)")
        }
        sqlite3_reset(stmt)
        sqlite3_clear_bindings(stmt)
        for (i, value) in values.enumerated() {
            try bindOne(value, at: Int32(i + 1))
        }
    }

    /// Ends a statement that was not stepped to completion, so it holds no read lock.
    func reset() {
        sqlite3_reset(stmt)
    }

    /// Steps once: true if a row is available, false when done.
    func step() throws(SQLiteError) -> Bool {
        guard stmt != nil else {
            throw SQLiteError(code: SQLITE_MISUSE, message: "the connection is closed", context: "running \(sql)")
        }
        let rc = sqlite3_step(stmt)
        switch rc {
        case SQLITE_ROW: return true
        case SQLITE_DONE:
            sqlite3_reset(stmt)
            return false
        default:
            sqlite3_reset(stmt)
            throw connection.error(rc, "running \(sql)")
        }
    }

    /// Runs a statement that returns no rows.
    func run(_ values: SQLiteValue...) throws(SQLiteError) {
        try bind(values)
        while try step() {}
    }

    private func bindOne(_ value: SQLiteValue, at position: Int32) throws(SQLiteError) {
        let rc: Int32
        switch value {
        case .int(let v):
            rc = sqlite3_bind_int64(stmt, position, v)
        case .text(let s):
            rc = sqlite3_bind_text(stmt, position, s, -1, SQLITE_TRANSIENT)
        case .blob(let bytes):
            rc = bytes.withUnsafeBytes { raw in
                sqlite3_bind_blob(
                    stmt, position, raw.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32(raw.count),
                    SQLITE_TRANSIENT)
            }
        }
        guard rc == SQLITE_OK else { throw connection.error(rc, "binding parameter \(position) of \(sql)") }
    }

    func int(_ column: Int32) -> Int64 { sqlite3_column_int64(stmt, column) }

    func text(_ column: Int32) -> String? {
        guard let p = sqlite3_column_text(stmt, column) else { return nil }
        return String(cString: p)
    }

    func blob(_ column: Int32) -> [UInt8] {
        let count = Int(sqlite3_column_bytes(stmt, column))
        guard count > 0, let p = sqlite3_column_blob(stmt, column) else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: count))
    }
}

enum SQLiteValue {
    case int(Int64)
    case text(String)
    case blob([UInt8])
}

/// fsync of a directory, so that a file created or renamed in it survives a crash.
func fsyncDirectory(_ path: String) throws(SQLiteError) {
    let fd = open(path, O_RDONLY | O_DIRECTORY)
    guard fd >= 0 else {
        throw SQLiteError(code: errno, message: String(cString: strerror(errno)), context: "opening directory \(path)")
    }
    defer { _ = close(fd) }
    if fsync(fd) != 0 {
        throw SQLiteError(code: errno, message: String(cString: strerror(errno)), context: "fsync of directory \(path)")
    }
}
