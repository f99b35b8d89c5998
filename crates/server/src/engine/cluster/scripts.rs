//! The Lua scripts that change a job's keys in Redis in one atomic step (queue, lease,
//! record, index); each says its KEYS and ARGV.

/// Queues a job unless MAX_QUEUED_JOBS are waiting (cluster-wide). KEYS: queue, job, index.
/// ARGV: id, record, max queued, record ttl ms, created ms. Returns the queue length (the new
/// job's position), or -1 when full.
pub const SUBMIT: &str = r"
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -1 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return redis.call('LPUSH', KEYS[1], ARGV[1])
";

/// Takes the next job into this worker's processing list and leases it, in one step.
/// KEYS: queue, processing. ARGV: lease key prefix, worker id, lease ms.
pub const CLAIM: &str = r"
local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
if not id then return false end
redis.call('SET', ARGV[1] .. id, ARGV[2], 'PX', ARGV[3])
return id
";

/// Keeps the lease while it is ours (or lapsed and nobody took the job). KEYS: lease.
/// ARGV: worker id, lease ms. 0: another worker holds it now.
pub const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Writes a running job's record and/or publishes one of its events, unless it has ended
/// (0) or its record is gone (-1: expired or evicted; a record is never written back without
/// its TTL, and a job whose record is gone stops). KEYS: done, job. ARGV: record ('' to keep),
/// channel, message ('' for none).
pub const UPDATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if ARGV[1] ~= '' then redis.call('SET', KEYS[2], ARGV[1], 'KEEPTTL') end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
";

/// Ends a job at most once: only the first to set `done` writes the final record and
/// publishes the terminal event; -1 when the record is gone (nothing is written, so the
/// job does not come back). KEYS: done, job. ARGV: who, record, ttl ms, channel, message.
pub const FINISH: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Ends a job that is still waiting (cancel, deadline): out of the queue, then as FINISH.
/// KEYS: queue, done, job. ARGV: id, record, ttl ms, channel, message.
pub const END_QUEUED: &str = r"
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
if not redis.call('SET', KEYS[2], 'api', 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Puts a job whose lease ran out (or whose worker gave it back) at the head of the queue,
/// with its record reset. KEYS: processing, lease, done, queue, job. ARGV: id, record, and
/// '1' to give back our own lease (a worker shutting down) rather than require it lapsed.
pub const REQUEUE: &str = r"
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[5]) == 0 then return 0 end
redis.call('SET', KEYS[5], ARGV[2], 'KEEPTTL')
redis.call('RPUSH', KEYS[4], ARGV[1])
return 1
";
