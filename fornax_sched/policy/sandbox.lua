-- sandbox.lua: the Lua side of the policy worker (see worker.py and policy(5)).
--
-- The worker loads this chunk into a fresh Lua 5.4 state and calls the
-- functions it returns.  Policy code never sees this chunk's locals: it is
-- loaded as text ("t", so bytecode is refused) into an environment built by
-- new_env() that holds only safe functions and the helpers defined here.
-- The cluster is mirrored in read-only tables, updated by deltas between
-- decisions, so that a decision does not pay for converting every node.
--
-- One sandbox runs one policy: a user's (with the platform policy loaded
-- beside it as the library behind platform.decide), or the platform's own.
--
-- Limits: a count hook stops a policy that runs past its deadline, an
-- absolute time on the scheduler's clock (CLOCK_MONOTONIC), and once it has
-- passed nothing the policy catches (pcall, xpcall, coroutines, at any depth)
-- makes the turn anything but timed out.  One long call inside a C function
-- cannot be stopped from here; the scheduler kills the whole worker for that,
-- at the deadline and a grace.

local M = {}

-- What the harness needs, captured before any policy code runs.
local error, ipairs, next, pairs, pcall, xpcall, select, setmetatable, tostring, type =
  error, ipairs, next, pairs, pcall, xpcall, select, setmetatable, tostring, type
local tonumber, load, collectgarbage = tonumber, load, collectgarbage
local clock, sethook, getinfo = os.clock, debug.sethook, debug.getinfo
local co_create, co_resume, co_close = coroutine.create, coroutine.resume, coroutine.close
local floor, huge, tointeger = math.floor, math.huge, math.tointeger
local concat, sort, pack, unpack = table.concat, table.sort, table.pack, table.unpack
local sfind, sformat, ssub, sbyte, slower, sgsub, smatch, sgmatch =
  string.find, string.format, string.sub, string.byte, string.lower, string.gsub, string.match, string.gmatch

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- Methods on strings ("x"):rep(3) come from the string metatable's __index:
-- point it at a private copy without dump, which no policy can reach.
local SAFE_STRING = copy(string)
SAFE_STRING.dump = nil
string.dump = nil
getmetatable("").__index = SAFE_STRING
math.randomseed(1) -- decisions are reproducible from one sandbox start to the next

---------------------------------------------------------------- read-only views

local RAW = setmetatable({}, { __mode = "k" }) -- view -> the table it shows

local function readonly()
  error("the context is read-only", 2)
end

-- A view reads through to raw and refuses writes; # and pairs work on it.
local function view(raw)
  local v = {}
  setmetatable(v, {
    __index = raw,
    __newindex = readonly,
    __len = function() return #raw end,
    __pairs = function() return function(_, k) return next(raw, k) end, v, nil end,
    __metatable = false,
  })
  RAW[v] = raw
  return v
end

---------------------------------------------------------------- globs

-- Glob matching exactly as Python's fnmatch.fnmatchcase (the core uses it):
-- *, ?, [set], [!set], ranges; an unclosed [ is a literal.  Patterns with at
-- most one * become Lua patterns (matched in C); others use a matcher with
-- one backtrack point, which is linear where a pattern would not be.

-- The set of bytes a [...] stands for.  raw is what lies between [ and ]
-- (with its leading ! if any).  This follows fnmatch.translate step by step,
-- quirks included: it splits raw into chunks at the dashes that make ranges,
-- drops empty ranges (z-a) by merging chunks, and only then reads a leading
-- ! as negation, so [a-1!] (the range a-1 dropped) matches any character.
local function class_set(raw)
  local stuff
  if not sfind(raw, "-", 1, true) then
    stuff = { raw }
  else
    local chunks, start = {}, 1
    local k = ssub(raw, 1, 1) == "!" and 3 or 2
    while true do
      local d = sfind(raw, "-", k, true)
      if not d then break end
      chunks[#chunks + 1] = ssub(raw, start, d - 1)
      start, k = d + 1, d + 3
    end
    local last = ssub(raw, start)
    if last ~= "" then chunks[#chunks + 1] = last else chunks[#chunks] = chunks[#chunks] .. "-" end
    for i = #chunks, 2, -1 do
      local a, b = chunks[i - 1], chunks[i]
      if a ~= "" and sbyte(a, -1) > sbyte(b, 1) then
        chunks[i - 1] = ssub(a, 1, -2) .. ssub(b, 2)
        table.remove(chunks, i)
      end
    end
    stuff = chunks
  end
  -- stuff: chunks; between two chunks a range from the last byte of one to
  -- the first of the next; every other byte stands for itself.
  local first = stuff[1]
  if #stuff == 1 and first == "" then return {} end -- never matches
  if #stuff == 1 and first == "!" then return { neg = true } end -- any character
  local set = {}
  if ssub(first, 1, 1) == "!" then
    set.neg = true
    stuff[1] = ssub(first, 2)
  end
  for i, chunk in ipairs(stuff) do
    local from, to = 1, #chunk
    if i > 1 then from = 2 end -- its first byte ended the previous range
    if i < #stuff then to = #chunk - 1 end -- its last byte starts the next
    for j = from, to do set[sbyte(chunk, j)] = true end
    if i < #stuff then
      local lo, hi = sbyte(chunk, #chunk), sbyte(stuff[i + 1], 1)
      if lo == nil then -- [!-x]: nothing before the dash once ! is read, so no range
        set[sbyte("-")], set[hi] = true, true
      else
        for b = lo, hi do set[b] = true end
      end
    end
  end
  return set
end

local function glob_tokens(pat)
  -- A list of tokens: "*", or a table set of byte -> true (negated by .neg).
  local toks, i, n = {}, 1, #pat
  while i <= n do
    local c = ssub(pat, i, i)
    i = i + 1
    if c == "*" then
      if toks[#toks] ~= "*" then toks[#toks + 1] = "*" end
    elseif c == "?" then
      toks[#toks + 1] = { neg = true }
    elseif c == "[" then
      local j = i
      if ssub(pat, j, j) == "!" then j = j + 1 end
      if ssub(pat, j, j) == "]" then j = j + 1 end
      while j <= n and ssub(pat, j, j) ~= "]" do j = j + 1 end
      if j > n then
        toks[#toks + 1] = { [91] = true } -- a literal [
      else
        toks[#toks + 1] = class_set(ssub(pat, i, j - 1))
        i = j + 1
      end
    else
      toks[#toks + 1] = { [sbyte(c)] = true }
    end
  end
  return toks
end

local function one(tok, b)
  if tok.neg then return not tok[b] end
  return tok[b] == true
end

local function token_matcher(toks)
  return function(s)
    local si, ti, n, m = 1, 1, #s, #toks
    local star_t, star_s = nil, 0
    while si <= n do
      local tok = toks[ti]
      if tok == "*" then
        star_t, star_s, ti = ti, si, ti + 1
      elseif tok ~= nil and one(tok, sbyte(s, si)) then
        si, ti = si + 1, ti + 1
      elseif star_t then
        star_s = star_s + 1
        si, ti = star_s, star_t + 1
      else
        return false
      end
    end
    while toks[ti] == "*" do ti = ti + 1 end
    return ti > m
  end
end

local function escaped(b)
  local c = string.char(b)
  if sfind(c, "^%w$") then return c end
  return "%" .. c
end

local function lua_class(tok)
  local parts = {}
  for b = 0, 255 do
    if tok[b] then parts[#parts + 1] = escaped(b) end
  end
  if tok.neg then
    if #parts == 0 then return "." end
    return "[^" .. concat(parts) .. "]"
  end
  if #parts == 0 then return nil end -- an empty set: never matches
  if #parts == 1 then return parts[1] end
  return "[" .. concat(parts) .. "]"
end

local function compile_glob(pat)
  local toks = glob_tokens(pat)
  local stars = 0
  for _, t in ipairs(toks) do if t == "*" then stars = stars + 1 end end
  if stars > 1 then return token_matcher(toks) end
  local parts = { "^" }
  for _, t in ipairs(toks) do
    if t == "*" then
      parts[#parts + 1] = ".*"
    else
      local class = lua_class(t)
      if class == nil then return function() return false end end
      parts[#parts + 1] = class
    end
  end
  parts[#parts + 1] = "$"
  local lp = concat(parts)
  return function(s) return sfind(s, lp) ~= nil end
end

local GLOBS, nglobs = {}, 0

local function glob(name, pattern)
  if type(name) ~= "string" or type(pattern) ~= "string" then
    error("glob(name, pattern): want two strings, got " .. type(name) .. " and " .. type(pattern), 2)
  end
  local f = GLOBS[pattern]
  if f == nil then
    if nglobs >= 1000 then GLOBS, nglobs = {}, 0 end
    f = compile_glob(pattern)
    GLOBS[pattern], nglobs = f, nglobs + 1
  end
  return f(name)
end

---------------------------------------------------------------- sizes

local UNITS = { [""] = 1, k = 1 << 10, m = 1 << 20, g = 1 << 30, t = 1 << 40 }

-- "512K", "64M", "1.5G", "100" (bytes; a B or iB may follow) -> bytes, as
-- fornax_sched.units.parse_size reads them; a number is returned as it is.
local MAX_SIZE = 1 << 53 -- 8192T, the most a size may say (units.MAX_SIZE)

local function size(text)
  if type(text) == "number" then return text end
  if type(text) ~= "string" then error("size: want a string such as 512M, got " .. type(text), 2) end
  local s = slower(smatch(text, "^%s*(.-)%s*$"))
  local num, rest = smatch(s, "^(%d+%.%d+)(.*)$")
  if not num then num, rest = smatch(s, "^(%d+)(.*)$") end
  if num then
    rest = smatch(rest, "^%s*(.*)$")
    local unit = ssub(rest, 1, 1)
    if UNITS[unit] and unit ~= "" then rest = ssub(rest, 2) else unit = "" end
    if rest == "" or rest == "b" or rest == "ib" then
      -- As units.parse_size: a whole number exactly (no float rounding, no integer wrap-around),
      -- one with a fraction in floating point.
      local whole = not sfind(num, ".", 1, true) and tointeger(tonumber(num))
      local n
      if whole then
        n = whole <= MAX_SIZE // UNITS[unit] and whole * UNITS[unit] or MAX_SIZE + 1
      else
        n = floor((tonumber(num) + 0.0) * UNITS[unit])
      end
      if n > MAX_SIZE then error(sformat("size: bad size %q: must be at most 8192T", text), 2) end
      return tointeger(n) or n
    end
  end
  error(sformat("size: bad size %q: want bytes or a size such as 512K, 64M or 1G", text), 2)
end

---------------------------------------------------------------- the cluster mirror

local ORDER, NODE, PLACED = {}, {}, {} -- node views sorted by name; name -> node; container -> placement
local ORDER_VIEW, NODE_VIEW, PLACED_VIEW = view(ORDER), view(NODE), view(PLACED)
local ncontainers = 0

local function by_name(a, b) return RAW[a].name < RAW[b].name end

local function unplace(raw)
  local names = RAW[raw.containers]
  if names == nil then return end
  for i = 1, #names do
    local p = PLACED[names[i]]
    if p ~= nil and RAW[p].node == raw.name then PLACED[names[i]] = nil end
  end
  ncontainers = ncontainers - #names
end

-- d: {name, cpus, mem, used_cpus, used_mem, labels = {k = v}, status, cordoned, kind,
--     containers = {name, image, cpus, mem, name, image, ...}} (fresh tables).
local function set_node(d)
  local name = d.name
  local v = NODE[name]
  local raw, added = nil, false
  if v ~= nil then
    raw = RAW[v]
    unplace(raw)
  else
    raw = {}
    v = view(raw)
    NODE[name] = v
    ORDER[#ORDER + 1] = v
    added = true
  end
  raw.name, raw.cpus, raw.mem = name, d.cpus, d.mem
  raw.used_cpus, raw.used_mem = d.used_cpus, d.used_mem
  raw.free_cpus, raw.free_mem = d.cpus - d.used_cpus, d.mem - d.used_mem
  raw.status, raw.cordoned, raw.kind = d.status, d.cordoned, d.kind or "fornax"
  raw.usable = d.status == "online" and not d.cordoned
  raw.labels = view(d.labels)
  local flat, names = d.containers, {}
  for i = 1, #flat, 4 do
    local c = flat[i]
    names[#names + 1] = c
    PLACED[c] = view({ name = c, node = name, image = flat[i + 1], cpus = flat[i + 2], mem = flat[i + 3] })
  end
  raw.containers = view(names)
  raw.ncontainers = #names
  ncontainers = ncontainers + #names
  return added
end

local function drop_node(name)
  local v = NODE[name]
  if v == nil then return false end
  local raw = RAW[v]
  unplace(raw)
  raw.status, raw.usable = "removed", false
  NODE[name] = nil
  return true
end

-- Apply a batch of node deltas; full replaces the whole mirror.
function M.sync(full, nodes, gone)
  if full then
    ORDER, NODE, PLACED = {}, {}, {}
    ORDER_VIEW, NODE_VIEW, PLACED_VIEW = view(ORDER), view(NODE), view(PLACED)
    ncontainers = 0
  end
  local added, dropped = false, false
  if gone then
    for i = 1, #gone do dropped = drop_node(gone[i]) or dropped end
  end
  if nodes then
    for i = 1, #nodes do added = set_node(nodes[i]) or added end
  end
  if dropped then
    local kept = {}
    for i = 1, #ORDER do
      if NODE[RAW[ORDER[i]].name] == ORDER[i] then kept[#kept + 1] = ORDER[i] end
    end
    for i = 1, #ORDER do ORDER[i] = kept[i] end
  end
  if added or dropped then sort(ORDER, by_name) end
  return #ORDER, ncontainers
end

function M.stats()
  return #ORDER, ncontainers
end

---------------------------------------------------------------- requests and feasibility

local REQ = setmetatable({}, { __mode = "k" }) -- request view -> what fits() reads

local function request_view(r)
  local raw = {
    image = r.image, name = r.name, cpus = r.cpus, mem = r.mem, replicas = r.replicas,
    labels = view(r.labels), include = view(r.include), exclude = view(r.exclude),
    avoid = view(r.avoid), args = view(r.args), constraints = r.constraints,
  }
  local v = view(raw)
  REQ[v] = { cpus = r.cpus, mem = r.mem, pairs = r.pairs, include = r.include, exclude = r.exclude, avoid = r.avoid }
  return v
end

local function list_of(x)
  if x == nil then return {} end
  if type(x) == "string" then return { x } end
  local out = {}
  for i = 1, #x do out[i] = x[i] end
  return out
end

-- What fits() reads of a request that did not come from the context (a
-- policy may ask whether a hypothetical request would fit).
local function request_facts(req)
  local r = REQ[req]
  if r ~= nil then return r end
  if type(req) ~= "table" then error("want a request table, got " .. type(req), 3) end
  local wanted = {}
  if req.labels ~= nil then
    for k, v in pairs(req.labels) do wanted[#wanted + 1] = { k, v } end
  end
  return {
    cpus = tonumber(req.cpus) or 0, mem = req.mem and size(req.mem) or 0, pairs = wanted,
    include = list_of(req.include), exclude = list_of(req.exclude), avoid = list_of(req.avoid),
  }
end

local function node_raw(node, who)
  local raw = RAW[node]
  if raw == nil or raw.containers == nil then
    error(who .. ": want a node from ctx.nodes, got " .. type(node), 3)
  end
  return raw
end

local function runs_raw(raw, globs)
  local names, count = RAW[raw.containers], 0
  for i = 1, #names do
    for j = 1, #globs do
      if glob(names[i], globs[j]) then
        count = count + 1
        break
      end
    end
  end
  return count
end

-- runs(node, globs): how many of the node's containers match any glob (a string or a list).
local function runs(node, globs)
  return runs_raw(node_raw(node, "runs"), list_of(globs))
end

local function allows(raw, r)
  local inc = r.include
  if #inc > 0 then
    local ok = false
    for i = 1, #inc do
      if glob(raw.name, inc[i]) then
        ok = true
        break
      end
    end
    if not ok then return false end
  end
  local exc = r.exclude
  for i = 1, #exc do
    if glob(raw.name, exc[i]) then return false end
  end
  local labels, wanted = RAW[raw.labels], r.pairs
  for i = 1, #wanted do
    if labels[wanted[i][1]] ~= wanted[i][2] then return false end
  end
  return true
end

-- fits(node, req) -> true, or false and why: "down", "cordoned", "filtered"
-- (node name or labels), "full" or "avoid" (anti-affinity).  The same test
-- as the core's Cluster.feasible, in the same order as its reasons.
local function fits(node, req)
  local raw = node_raw(node, "fits")
  local r = request_facts(req)
  if raw.status ~= "online" then return false, "down" end
  if raw.cordoned then return false, "cordoned" end
  if not allows(raw, r) then return false, "filtered" end
  if raw.used_cpus + r.cpus > raw.cpus + 1e-9 or raw.used_mem + r.mem > raw.mem then return false, "full" end
  if #r.avoid > 0 and runs_raw(raw, r.avoid) > 0 then return false, "avoid" end
  return true
end

local WHY = { "down", "cordoned", "filtered", "full", "avoid", "excluded" }

-- why_not(ctx): why no node takes the request, worded as the core words it.
local function why_not(ctx)
  local req, exclude = ctx.request, ctx.exclude
  local counts = { down = 0, cordoned = 0, filtered = 0, full = 0, avoid = 0, excluded = 0 }
  local nodes = ctx.nodes
  if #nodes == 0 then return "no nodes" end
  local need = req.constraints
  if need ~= nil and need ~= "" then need = " " .. need else need = "" end
  local most_cpus, most_mem = 0, 0
  for i = 1, #nodes do
    local raw = node_raw(nodes[i], "why_not")
    if raw.cpus > most_cpus then most_cpus = raw.cpus end
    if raw.mem > most_mem then most_mem = raw.mem end
  end
  local r = request_facts(req)
  if r.cpus > most_cpus + 1e-9 or r.mem > most_mem then -- too big for every node, whatever its state
    return "no node fits" .. need .. ": " .. #nodes .. " too small (it asks for more than any node offers)"
  end
  for i = 1, #nodes do
    local node = nodes[i]
    local why
    if exclude[node.name] then
      why = "excluded"
    else
      local ok
      ok, why = fits(node, req)
      if ok then why = "avoid" end -- as the core counts it: feasible yet refused
    end
    counts[why] = counts[why] + 1
  end
  local parts = {}
  for _, k in ipairs(WHY) do
    if counts[k] > 0 then parts[#parts + 1] = counts[k] .. " " .. k end
  end
  return "no node fits" .. need .. ": " .. concat(parts, ", ")
end

---------------------------------------------------------------- ranking helpers

-- Named rankings for pick(): higher ranks first.
local BY = {
  least_loaded = function(n) return -n.ncontainers end,
  most_loaded = function(n) return n.ncontainers end,
  most_cpu_free = function(n) return n.free_cpus end,
  most_mem_free = function(n) return n.free_mem end,
  least_cpu_free = function(n) return -n.free_cpus end,
  least_mem_free = function(n) return -n.free_mem end,
}

-- pick(ctx [, keep [, rank]]) -> the node the request fits (and keep(node)
-- allows) that ranks highest; rank returns one or two numbers, compared in
-- turn; ties go to the first by name.  Default rank: least loaded.
local function pick(ctx, keep, rank)
  rank = rank or BY.least_loaded
  local req, exclude, nodes = ctx.request, ctx.exclude, ctx.nodes
  local best, b1, b2
  for i = 1, #nodes do
    local n = nodes[i]
    if keep == nil or keep(n) then
      local r1, r2 = rank(n)
      r2 = r2 or 0
      if type(r1) ~= "number" or type(r2) ~= "number" then error("pick: rank must return numbers", 2) end
      if best == nil or r1 > b1 or (r1 == b1 and r2 > b2) then
        if not exclude[n.name] and fits(n, req) then best, b1, b2 = n, r1, r2 end
      end
    end
  end
  return best
end

---------------------------------------------------------------- limits

-- One clock: the scheduler sends each turn's deadline as an absolute time on
-- CLOCK_MONOTONIC, and the worker gives us time.monotonic (M.set_clock), so
-- the time a message waited in the pipe counts and a loaded machine stops a
-- policy at the same instant the scheduler would give up on it.
local now = clock -- until the worker sets the monotonic clock

function M.set_clock(f)
  now = f
end

local TIMEOUT = {} -- the error a stopped policy raises; only this chunk can make it
local COUNT = 10000 -- instructions between looks at the clock
local deadline = huge -- the end of the current turn, on now()'s clock
-- Once the deadline has passed, the turn is over whatever the policy's code
-- catches: the hook raises again at every count, every wrapped pcall, xpcall
-- and coroutine function raises again when it returns, and the harness
-- treats the turn as timed out.  The flag matters where Lua itself swallows
-- the stop: at the C-stack limit, the hook cannot even be called (the call
-- fails with "C stack overflow"), nor can error() raise TIMEOUT.
local stopped = false
local stopped_at = nil -- the policy's line it was stopped at (false: not known)

-- The innermost line of policy code on the stack, or nil.
local function policy_line()
  for level = 2, 40 do
    local info = getinfo(level, "Sl")
    if info == nil then break end
    if info.source == "=policy" and info.currentline > 0 then return info.currentline end
  end
  return nil
end

local function stop()
  if not stopped then
    stopped, stopped_at = true, false -- first: what follows may itself fail at the C-stack limit
    stopped_at = policy_line() or false
  end
  error(TIMEOUT, 0)
end

local function hook()
  if stopped or now() > deadline then stop() end
end

-- After anything that caught an error (or may have): past the deadline, stop.
local function pass_stop(...)
  if stopped or now() > deadline then stop() end
  return ...
end

local function safe_pcall(f, ...)
  if stopped then stop() end
  return pass_stop(pcall(f, ...))
end

local function safe_xpcall(f, handler, ...)
  if stopped then stop() end
  return pass_stop(xpcall(f, function(e)
    if stopped or e == TIMEOUT then return TIMEOUT end -- the policy's handler never sees a stop
    return handler(e)
  end, ...))
end

local function co_new(f)
  local co = co_create(f)
  sethook(co, hook, "", COUNT)
  return co
end

local function co_resume_safe(co, ...)
  if stopped then stop() end
  return pass_stop(co_resume(co, ...))
end

local function co_wrap(f)
  local co = co_new(f)
  return function(...)
    if stopped then stop() end
    local r = pack(co_resume(co, ...))
    if stopped or now() > deadline then stop() end
    if not r[1] then error(r[2], 0) end
    return unpack(r, 2, r.n)
  end
end

local function co_close_safe(co)
  if stopped then stop() end
  return pass_stop(co_close(co))
end

local error_line = nil -- where the error that ended the turn was raised, if in policy code

local function note_line(e)
  if e ~= TIMEOUT and not stopped then error_line = policy_line() end
  return e
end

-- Run f(...) under the hook until the absolute time end_at; a table.pack of
-- pcall's results, {false, TIMEOUT} for a turn that ran past end_at, however
-- it ended.
local function limited(end_at, f, ...)
  deadline, stopped, stopped_at, error_line = end_at, false, nil, nil
  sethook(hook, "", COUNT)
  local r = pack(xpcall(f, note_line, ...))
  sethook()
  local late = stopped or now() > deadline
  deadline = huge
  if late then
    stopped = true
    return { false, TIMEOUT, n = 2 }
  end
  return r
end

---------------------------------------------------------------- environments

local LOG, LOG_MAX = {}, 50

-- One line of printable text, at most max bytes (and valid UTF-8 kept as it is).
local function clean(s, max)
  if #s > max then s = ssub(s, 1, max) .. "..." end
  if utf8.len(s) then
    s = sgsub(s, "[\0-\31\127]", "?")
  else
    s = sgsub(s, "[\0-\31\127-\255]", "?")
  end
  return s
end

-- log(...): a line for the scheduler's log (print does the same).
local function log(...)
  if #LOG >= LOG_MAX then return end
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  LOG[#LOG + 1] = clean(concat(parts, " "), 300)
end

local PLATFORM_API = {} -- filled in once the platform policy is loaded

local function new_env()
  local env = {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, select = select,
    tonumber = tonumber, tostring = tostring, type = type, pcall = safe_pcall, xpcall = safe_xpcall,
    print = log, unpack = table.unpack,
    string = copy(SAFE_STRING), table = copy(table), math = copy(math), utf8 = copy(utf8),
    coroutine = {
      create = co_new, resume = co_resume_safe, wrap = co_wrap, yield = coroutine.yield,
      status = coroutine.status, running = coroutine.running, isyieldable = coroutine.isyieldable,
      close = co_close_safe,
    },
    glob = glob, size = size, fits = fits, runs = runs, why_not = why_not, pick = pick, log = log,
    by = copy(BY), platform = copy(PLATFORM_API),
  }
  env.math.randomseed = nil
  return env
end

-- An error as one line of text: Lua's "policy:N:" made "line N:" (or, for an
-- error raised elsewhere, the policy line it was raised from, if known); a
-- traceback or anything after the first line dropped.
local function first_line(s)
  for line in sgmatch(s, "[^\r\n]+") do
    if sfind(line, "%S") then return line end
  end
  return ""
end

local function message(e)
  if type(e) == "string" or type(e) == "number" then
    e = tostring(e)
    local n, rest = smatch(e, "^policy:(%d+): (.*)$")
    if n then e = rest end
    e = first_line(e)
    if e == "" then e = "an error with an empty message" end
    if n then e = "line " .. n .. ": " .. e end
  else
    e = "an error with a " .. type(e) .. " value"
  end
  if error_line and not sfind(e, "^line %d+: ") then e = "line " .. error_line .. ": " .. e end
  return clean(e, 400)
end

local function failure(e, ms)
  if e == TIMEOUT then
    local at = stopped_at and (" at line " .. stopped_at) or ""
    return "timeout", "ran past " .. ms .. " ms" .. at
  end
  if e == "not enough memory" then return "memory", "ran out of memory" end
  return "error", message(e)
end

local ENTRY = { "decide", "filter", "score" }

local function ms_of(seconds)
  return floor(seconds * 1000 + 0.5)
end

-- Load src as a policy into a fresh environment, its top-level code running
-- until the absolute time end_at at most; the env, or nil, kind, why.
local function load_policy(src, end_at, load_ms)
  local env = new_env()
  -- under pcall: the parser running out of C stack is an error, not a syntax error
  local ok, chunk, err = pcall(load, src, "=policy", "t", env)
  if not ok then return nil, "syntax", message(chunk) end
  if chunk == nil then return nil, "syntax", message(err) end
  local r = limited(end_at, chunk)
  if not r[1] then return nil, failure(r[2], load_ms) end
  local found = false
  for _, name in ipairs(ENTRY) do
    local f = env[name]
    if f ~= nil then
      if type(f) ~= "function" then return nil, "error", name .. " is a " .. type(f) .. ", not a function" end
      found = true
    end
  end
  if not found then return nil, "error", "the policy defines none of decide, filter and score" end
  return env
end

-- This sandbox runs one policy: the user's, or (user_src nil) the platform's.
-- The user's sandbox also loads the platform policy, as the library behind
-- platform.decide(ctx); the platform's own answer, when the user's policy
-- fails, comes from the platform's own sandbox, another process.
local PLATFORM, PLATFORM_SRC, USER, USER_SRC, USER_ERR = nil, nil, nil, nil, nil
local budget_ms, LOAD_S = 50, 0.25

local function defined(env)
  local out = {}
  for _, name in ipairs(ENTRY) do
    if env[name] ~= nil then out[#out + 1] = name end
  end
  return concat(out, " ")
end

-- init(platform, user or nil, end_at, count, deadline, load): load both by
-- end_at (absolute); deadline (seconds) words timeouts, load bounds a reload.
-- -> true, nil, "decide score" | false, kind, why
function M.init(platform_src, user_src, end_at, count, deadline_s, load_s)
  COUNT, budget_ms, LOAD_S = count, ms_of(deadline_s), load_s
  PLATFORM_SRC, USER_SRC = platform_src, user_src
  local env, _, why = load_policy(platform_src, end_at, ms_of(load_s))
  if env == nil then
    USER_ERR = "the platform policy did not load: " .. why
    return false, "platform", USER_ERR
  end
  PLATFORM = env
  if user_src == nil then
    USER = PLATFORM
    return true, nil, defined(USER)
  end
  local kind
  USER, kind, why = load_policy(user_src, end_at, ms_of(load_s))
  if USER == nil then
    USER_ERR = why
    return false, kind, why
  end
  return true, nil, defined(USER)
end

-- After a memory error the policy's globals may hold the memory: drop them
-- now, and load the policy afresh when the scheduler asks (M.reload), outside
-- any decision's deadline.
function M.drop()
  USER, USER_ERR = nil, "dropped after it ran out of memory; not loaded again"
  if USER_SRC == nil then PLATFORM = nil end
  collectgarbage("collect")
end

function M.reload(end_at)
  local kind, why
  if USER_SRC == nil then
    PLATFORM, kind, why = load_policy(PLATFORM_SRC, end_at, ms_of(LOAD_S))
    USER = PLATFORM
  else
    USER, kind, why = load_policy(USER_SRC, end_at, ms_of(LOAD_S))
  end
  if USER == nil then
    USER_ERR = why
    return false, kind, why
  end
  return true, nil, defined(USER)
end

---------------------------------------------------------------- deciding

local MAX_LIST = 100000

-- The policy's answer, normalised: "node", name, why | "list", names, why |
-- "none", reason | "bad", what was wrong.  nil alone from decide falls
-- through to filter and score.
local function normalise(a, b)
  if b ~= nil and type(b) ~= "string" then
    return "bad", "decide's second value is a " .. type(b) .. " (want a string: the reason)"
  end
  if type(a) == "string" then return "node", a, b end
  if a == nil then return "none", b end
  if type(a) ~= "table" then
    return "bad", "decide returned a " .. type(a) .. " (want a node name, a list of names, or nil and a reason)"
  end
  local name, refused = a.name, a.unschedulable
  if type(name) == "string" and a[1] == nil then return "node", name, b end -- a node
  if refused ~= nil then
    if type(refused) ~= "string" then return "bad", "unschedulable must be a string (the reason)" end
    return "none", refused
  end
  local n = #a
  if n == 0 and next(a) ~= nil then
    return "bad", "decide returned a table that is not a node, a list of names or {unschedulable = reason}"
  end
  if n > MAX_LIST then return "bad", "decide ranked " .. n .. " nodes" end
  local names = {}
  for i = 1, n do
    local x = a[i]
    if type(x) == "table" then x = x.name end
    if type(x) ~= "string" then
      return "bad", "decide's list holds a " .. type(x) .. " at " .. i .. " (want node names)"
    end
    names[i] = x
  end
  return "list", names, b
end

local function pipeline(env, ctx)
  local filter, score = env.filter, env.score
  local req, exclude, nodes = ctx.request, ctx.exclude, ctx.nodes
  local best, best_s, best_c, looked, refused = nil, 0, 0, 0, 0
  for i = 1, #nodes do
    local n = nodes[i]
    if not exclude[n.name] and fits(n, req) then
      if filter == nil or filter(n, req, ctx) then
        looked = looked + 1
        local s = 0
        if score ~= nil then
          s = score(n, req, ctx)
          if type(s) ~= "number" or s ~= s then
            return "bad", "score returned " .. (s ~= s and "nan" or "a " .. type(s)) .. " for " .. n.name
          end
        end
        local c = n.ncontainers
        if best == nil or s > best_s or (s == best_s and c < best_c) then best, best_s, best_c = n, s, c end
      else
        refused = refused + 1
      end
    end
  end
  if best == nil then
    if refused > 0 then return "none", "the policy's filter refused the " .. refused .. " nodes that fit" end
    return "none", why_not(ctx)
  end
  return "node", best.name, nil, looked
end

local function check(ctx, name)
  local node = NODE[name]
  if node == nil then return "does not exist" end
  if ctx.exclude[name] then return "is excluded" end
  local ok, why = fits(node, ctx.request)
  if not ok then return why == "down" and "is not online" or ("does not fit (" .. why .. ")") end
  return nil
end

-- The whole of one policy's turn, run under the hook: "node", name, why,
-- looked | "none", reason | "bad", what.
local function turn(env, ctx)
  local kind, a, b, looked
  if env.decide ~= nil then
    kind, a, b = normalise(env.decide(ctx))
    if kind == "none" and a == nil then kind = nil end -- nil alone: no opinion
  end
  if kind == nil then -- filter and score, or (with neither) the platform's order
    kind, a, b, looked = pipeline(env, ctx)
  end
  if kind == "node" then
    local wrong = check(ctx, a)
    if wrong then return "bad", "the policy chose " .. clean(a, 100) .. ", which " .. wrong end
    return "node", a, b, looked or #ORDER
  end
  if kind == "list" then
    if #a == 0 then return "none", b or "ranked no nodes" end
    for i = 1, #a do
      if check(ctx, a[i]) == nil then return "node", a[i], b or ("ranked " .. i .. " of " .. #a), #a end
    end
    return "bad", "none of the " .. #a .. " nodes the policy ranked fits"
  end
  return kind, a
end

-- platform.decide(ctx), for policies: the platform's answer (a node name, or nil and the reason).
function PLATFORM_API.decide(ctx)
  local kind, a, b = turn(PLATFORM, ctx)
  if kind == "node" then return a, b end
  if kind == "none" then return nil, a end
  error("the platform policy failed: " .. tostring(a), 2)
end

local function attempt(env, ctx, end_at)
  local r = limited(end_at, turn, env, ctx)
  if not r[1] then return "fail", failure(r[2], budget_ms) end
  local kind, a, b, looked = r[2], r[3], r[4], r[5]
  if kind == "bad" then return "fail", "bad", clean(a, 400) end
  if kind == "none" then return "none", clean(a or "unschedulable", 400) end
  return "node", a, b and clean(b, 200), looked
end

local function set_of(list)
  local s = {}
  for i = 1, #list do s[list[i]] = true end
  return s
end

-- Decide for container c with request r (excluding the nodes in exclude), by
-- this sandbox's policy, stopping it at the absolute time end_at.  The reply:
-- how ("node" | "none"), node, why, looked; or fail (a kind) and fail_why.
function M.decide(c, r, exclude, end_at)
  LOG = {}
  local ctx = view({
    container = c, request = request_view(r), nodes = ORDER_VIEW, node = NODE_VIEW,
    placements = PLACED_VIEW, exclude = view(set_of(exclude)),
  })
  local reply = { log = LOG }
  if USER == nil then
    reply.fail, reply.fail_why = "error", "the policy did not load: " .. tostring(USER_ERR)
    return reply
  end
  local kind, a, b, looked = attempt(USER, ctx, end_at)
  if kind == "fail" then
    reply.fail, reply.fail_why = a, b
    if a == "memory" then M.drop() end
    return reply
  end
  reply.how, reply.node, reply.why, reply.looked = kind, a, b, looked
  if kind == "none" then reply.node, reply.why = nil, a end
  return reply
end

-- For tests of the helpers themselves.
M.glob, M.size = glob, size

return M
