-- Argo CD health check for finetune.dev/FineTuneJob.
-- Install under resource.customizations.health.finetune.dev_FineTuneJob in argocd-cm
-- (see docs/gitops.md). Maps the operator's phase and kstatus conditions to Argo CD health.
hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the job"
  return hs
end
local generation = obj.metadata.generation
if obj.status.observedGeneration ~= nil and generation ~= nil and obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or phase
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Suspended" then
  hs.status = "Suspended"
elseif phase == "Failed" or phase == "Cancelled" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
  if obj.status.conditions ~= nil then
    for _, condition in ipairs(obj.status.conditions) do
      if condition.type == "Stalled" and condition.status == "True" then
        hs.status = "Degraded"
        message = condition.message or message
      end
    end
  end
  if hs.status == "Progressing" and obj.status.progress ~= nil and obj.status.progress.steps ~= nil then
    message = phase .. ": step " .. obj.status.progress.steps
  end
end
hs.message = message
return hs
