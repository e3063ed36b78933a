-- zone-spread.lua: spread the replicas of a service across zones, then nodes.
--
-- Nodes carry a zone label (label.zone east, say).  A new container goes
-- to the zone that runs the fewest containers of its image, and within
-- that zone to the node that runs the fewest containers of its image;
-- ties go to the node running the fewest containers overall, then the
-- first by name.  Requests the policy has no opinion on (an image nobody
-- runs yet, nodes without zones) get the same treatment: the counts are 0.
--
--   cat zone-spread.lua > /cluster/scheduler/policy     (see policy(5))

-- How many containers of image run on each node and in each zone.
local function counts(ctx, image)
  local per_node, per_zone = {}, {}
  for _, node in ipairs(ctx.nodes) do
    local n = 0
    for _, c in ipairs(node.containers) do
      if ctx.placements[c].image == image then n = n + 1 end
    end
    local zone = node.labels.zone or "-"
    per_node[node.name] = n
    per_zone[zone] = (per_zone[zone] or 0) + n
  end
  return per_node, per_zone
end

function decide(ctx)
  local per_node, per_zone = counts(ctx, ctx.request.image)
  -- pick: among the nodes the request fits, the highest rank (two numbers, compared in turn)
  local node = pick(ctx, nil, function(n)
    local zone = n.labels.zone or "-"
    return -per_zone[zone], -(per_node[n.name] * 1000 + n.ncontainers)
  end)
  if node == nil then
    return nil, why_not(ctx)
  end
  return node.name, "zone " .. (node.labels.zone or "-")
end
