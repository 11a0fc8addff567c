// A parallel loop whose caller never waits for a thread that has not started.
//
// OpenMP's `parallel for` ends at a barrier that every thread of the team must reach. Beside
// another job on the cores, one of them is often parked by the scheduler, and the whole call
// waits for it: a two-thread gather fell to 0.4x of one thread's rate beside a copying process on
// the 2-core EPYC. Here the caller and the pool's helpers claim chunks from one counter; the
// caller works through the chunks itself and then waits only for chunks a helper has begun, so a
// parked helper costs nothing and a running one adds its share.
#pragma once

#include <cstdint>
#include <functional>

namespace fasttl {

// Calls body(begin, end) over [0, n) in chunks of `chunk` items, on the calling thread and up to
// threads - 1 helpers; returns once every chunk is done. `body` must not throw.
void claim_parallel(int64_t n, int64_t chunk, int threads, const std::function<void(int64_t, int64_t)>& body);

}  // namespace fasttl
