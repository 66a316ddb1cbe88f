"""The Lua scripts of the shared spend book. Each runs atomically in Redis: every scope that applies
(the proxy-wide budget, the key's) is checked and reserved in one step, all or nothing.

Amounts are integer nano-dollars (exact sums, no float drift across replicas). Per scope there are
four keys: the day's and the month's spend (named by the window's start, so a new day starts from
zero and a counter can never be carried into another window), the money reserved by holds, and a
sorted set of the holds (score: when each lapses). Each hold is also a key of its own with a TTL;
a hold whose request died lapses on its own, and the next script to touch the scope subtracts it.
"""

from __future__ import annotations

# Drops the holds of scope i that have lapsed; returns its day, month and reserved figures.
_READ = """
local function read(i, now)
  local day, month, reserved, holds = KEYS[i*4+1], KEYS[i*4+2], KEYS[i*4+3], KEYS[i*4+4]
  local lapsed = redis.call('ZRANGEBYSCORE', holds, '-inf', now)
  local r = tonumber(redis.call('GET', reserved) or '0')
  if #lapsed > 0 then
    for _, member in ipairs(lapsed) do
      r = r - tonumber(string.match(member, '|(%d+)$'))
    end
    redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
    if r < 0 then r = 0 end
    redis.call('SET', reserved, string.format('%.0f', r))
  end
  return tonumber(redis.call('GET', day) or '0'), tonumber(redis.call('GET', month) or '0'), r
end
"""

# KEYS: 4 per scope, then the hold's own key.
# ARGV: now, lapses_at, ttl_ms, amount, member, scopes, then per scope: daily limit, monthly limit (-1: none).
# Returns {refused, d1, m1, r1, ...}: refused 0 when reserved, else 2*scope+1 (daily) or 2*scope+2 (monthly).
RESERVE = (
    _READ
    + """
local now, amount, n = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[6])
local refused, out = 0, {}
for i = 0, n - 1 do
  local d, m, r = read(i, now)
  local daily, monthly = tonumber(ARGV[7 + i*2]), tonumber(ARGV[8 + i*2])
  if refused == 0 then
    if daily >= 0 and d + r + amount > daily then refused = i*2 + 1
    elseif monthly >= 0 and m + r + amount > monthly then refused = i*2 + 2 end
  end
  out[#out + 1], out[#out + 2], out[#out + 3] = d, m, r
end
if refused == 0 then
  for i = 0, n - 1 do
    redis.call('INCRBY', KEYS[i*4+3], ARGV[4])
    redis.call('ZADD', KEYS[i*4+4], ARGV[2], ARGV[5])
    out[i*3 + 3] = out[i*3 + 3] + amount
  end
  redis.call('SET', KEYS[n*4+1], ARGV[4], 'PX', ARGV[3])
end
table.insert(out, 1, refused)
for k = 1, #out do out[k] = string.format('%.0f', out[k]) end
return out
"""
)

# KEYS: 4 per scope, then the hold's own key. ARGV: member ('' for none), amount, cost (may be negative),
# book in the day (1/0), book in the month (1/0), how long the day's and the month's counters are kept (s), scopes.
# The hold is released only if still there (a lapsed one was subtracted already): never twice.
SETTLE = (
    _READ
    + """
local member, amount, cost = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n, out = tonumber(ARGV[8]), {}
for i = 0, n - 1 do
  local reserved = KEYS[i*4+3]
  if member ~= '' and redis.call('ZREM', KEYS[i*4+4], member) == 1 then
    if tonumber(redis.call('DECRBY', reserved, ARGV[2])) < 0 then redis.call('SET', reserved, '0') end
  end
  if cost ~= 0 then
    for w = 1, 2 do
      if ARGV[3 + w] == '1' then
        local key = KEYS[i*4 + w]
        if tonumber(redis.call('INCRBY', key, ARGV[3])) < 0 then redis.call('SET', key, '0') end
        redis.call('EXPIRE', key, ARGV[5 + w])
      end
    end
  end
  local d, m, r = read(i, '-inf')
  out[#out + 1], out[#out + 2], out[#out + 3] = d, m, r
end
if member ~= '' then redis.call('DEL', KEYS[n*4+1]) end
for k = 1, #out do out[k] = string.format('%.0f', out[k]) end
return out
"""
)

# KEYS: 4 per scope. ARGV: now, scopes. Returns {d1, m1, r1, ...} (lapsed holds dropped first).
FIGURES = (
    _READ
    + """
local out = {}
for i = 0, tonumber(ARGV[2]) - 1 do
  local d, m, r = read(i, ARGV[1])
  out[#out + 1], out[#out + 2], out[#out + 3] = d, m, r
end
for k = 1, #out do out[k] = string.format('%.0f', out[k]) end
return out
"""
)

# KEYS: counters (day and month keys). ARGV: per key its ledger figure, then how long it is kept (s).
# max(redis, ledger): set only where the ledger says more; never added to, so N replicas seeding
# at once, or a Redis restored from an old snapshot, can neither double nor undercount.
SEED = """
local n = #KEYS
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tonumber(ARGV[i]) > current then redis.call('SET', KEYS[i], ARGV[i]) end
  redis.call('EXPIRE', KEYS[i], ARGV[n + i])
end
return n
"""
