import Synchronization

/// Something a streamed answer holds (a client's admission, a process's stdout) until its body has been written, or
/// until the body is dropped unwritten: Hummingbird writes the head first and never runs the body if that fails (the
/// client went away first). The body's closure captures this; `release` runs once, when the body ends or when the
/// closure is freed, whichever comes first.
final class ReleaseOnce: Sendable {
    private let action: @Sendable () -> Void
    private let released = Atomic(false)

    init(_ action: @escaping @Sendable () -> Void) {
        self.action = action
    }

    func release() {
        guard !released.exchange(true, ordering: .acquiringAndReleasing) else { return }
        action()
    }

    deinit { release() }
}
