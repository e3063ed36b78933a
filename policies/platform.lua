-- platform.lua: the platform policy of fornax-sched.
--
-- This is what decides when a Lua or YAML policy fails (an error, a
-- timeout, running out of memory, an answer that names no node the request
-- fits), and what policy(5)'s examples build on: copy it, change it, and
-- write it to the scheduler's policy file.  It decides as the built-in
-- "spread" policy does:
--
--   among the nodes the request fits, the one running the fewest
--   containers; on a tie, the first by name.
--
-- A policy defines decide(ctx), or filter(node, req, ctx) and
-- score(node, req, ctx), or both; see policy(5) for the context, the
-- helpers (fits, why_not, pick, glob, size, ...) and what decide may return.

function decide(ctx)
  local req = ctx.request
  local best, fewest = nil, 0
  -- ctx.nodes is sorted by name, so the first node met wins a tie.
  for _, node in ipairs(ctx.nodes) do
    local count = node.ncontainers
    -- Only a node that would beat the best so far needs the full test
    -- (fits: online, not cordoned, room for the cpus and memory asked,
    -- the request's name and label filters, its anti-affinity), which
    -- keeps one decision over thousands of nodes cheap.
    if (best == nil or count < fewest) and not ctx.exclude[node.name] and fits(node, req) then
      best, fewest = node, count
      if count == 0 then break end -- nothing beats an empty node
    end
  end
  if best == nil then
    return nil, why_not(ctx) -- unschedulable, worded as the built-in policy words it
  end
  return best.name, fewest .. " containers, fewest"
end

-- To pack instead of spread (fill the busiest node first), start best at
-- nil as above and keep a node when count > fewest, without the break.
