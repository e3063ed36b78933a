-- best-fit.lua: pack containers by memory, keeping big nodes free for big requests.
--
-- filter and score instead of decide: the scheduler calls them only for
-- nodes the request fits (online, not cordoned, room for its cpus and
-- memory, its name, label and anti-affinity constraints), and takes the
-- node with the highest score.
--
-- Nodes labelled role=reserved take only requests that ask for them
-- (place IMAGE role=reserved); among the others the one left with the
-- least free memory wins, so small containers fill the gaps.

function filter(node, req, ctx)
  return node.labels.role ~= "reserved" or req.labels.role == "reserved"
end

function score(node, req, ctx)
  local left = node.free_mem - req.mem
  return -left / size("1M")   -- less memory left over scores higher
end
