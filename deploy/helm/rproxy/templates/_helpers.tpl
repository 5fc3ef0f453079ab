{{/*
The name of every object and the app.kubernetes.io/name label: rproxy-agent unless
fullnameOverride says otherwise (see values.yaml).
*/}}
{{- define "rproxy.fullname" -}}
{{- default "rproxy-agent" .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels the DaemonSet selects its pods by. */}}
{{- define "rproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rproxy.fullname" . }}
{{- end -}}

{{/* The labels of every object. */}}
{{- define "rproxy.labels" -}}
{{- $labels := merge (dict "app.kubernetes.io/name" (include "rproxy.fullname" .)) .Values.commonLabels -}}
{{- toYaml $labels -}}
{{- end -}}

{{/* The image reference: repository:tag, or repository@digest. */}}
{{- define "rproxy.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The port of a --*-bind-address value: (list VALUE DEFAULT-PORT FLAG). A null value is the agent's
default port, "" (not served) gives "", IP:PORT its port.
*/}}
{{- define "rproxy.bindPort" -}}
{{- $addr := index . 0 -}}
{{- $default := index . 1 -}}
{{- $flag := index . 2 -}}
{{- if kindIs "invalid" $addr -}}
{{- $default -}}
{{- else if ne $addr "" -}}
{{- if not (regexMatch "^(\\[[0-9A-Fa-f:.]+\\]|[0-9.]+):[0-9]{1,5}$" $addr) -}}
{{- fail (printf "%s: %q is not IP:PORT (an IPv6 address in brackets) nor empty" $flag $addr) -}}
{{- end -}}
{{- $port := regexFind "[0-9]+$" $addr -}}
{{- if or (lt (atoi $port) 1) (gt (atoi $port) 65535) -}}
{{- fail (printf "%s: %q: the port must be 1 to 65535" $flag $addr) -}}
{{- end -}}
{{- $port -}}
{{- end -}}
{{- end -}}

{{/* The metrics port, or "" when --metrics-bind-address is "". */}}
{{- define "rproxy.metricsPort" -}}
{{- include "rproxy.bindPort" (list .Values.agent.metricsBindAddress "10249" "agent.metricsBindAddress") -}}
{{- end -}}

{{/* The health port, or "" when --healthz-bind-address is "". */}}
{{- define "rproxy.healthzPort" -}}
{{- include "rproxy.bindPort" (list .Values.agent.healthzBindAddress "10256" "agent.healthzBindAddress") -}}
{{- end -}}

{{/*
The container's args, as a YAML list: `rproxy-agent run` with a flag for each agent value that is
not null (or not empty, for the lists), then agent.extraArgs.
*/}}
{{- define "rproxy.args" -}}
{{- $a := .Values.agent -}}
{{- $args := list "run" "--node-name" "$(NODE_NAME)" "--pod-devices" (join "," $a.podDevices) -}}
{{- $args = concat $args (list "--bpffs" $a.bpffs) -}}
{{- if $a.devices -}}
{{- $args = concat $args (list "--devices" (join "," $a.devices)) -}}
{{- end -}}
{{- if $a.nodeportAddresses -}}
{{- $args = concat $args (list "--nodeport-addresses" (join "," $a.nodeportAddresses)) -}}
{{- end -}}
{{- if not (kindIs "invalid" $a.xdpMode) -}}
{{- $args = concat $args (list "--xdp-mode" $a.xdpMode) -}}
{{- end -}}
{{- $args = concat $args (list "--cgroup" $a.cgroup) -}}
{{- range $flag, $key := dict "--ct-gc-interval" "ctGcInterval" "--ct-max" "ctMax" "--ct-max-ipv6" "ctMaxIpv6" "--service-map-max" "serviceMapMax" "--backend-map-max" "backendMapMax" "--rescan-interval" "rescanInterval" -}}
{{- $v := index $a $key -}}
{{- if not (kindIs "invalid" $v) -}}
{{- $args = concat $args (list $flag (toString (int64 $v))) -}}
{{- end -}}
{{- end -}}
{{- range $flag, $key := dict "--healthz-bind-address" "healthzBindAddress" "--metrics-bind-address" "metricsBindAddress" "--snat-port-range" "snatPortRange" "--pod-sockets" "podSockets" -}}
{{- $v := index $a $key -}}
{{- if not (kindIs "invalid" $v) -}}
{{- $args = concat $args (list $flag (toString $v)) -}}
{{- end -}}
{{- end -}}
{{- with $a.snatPortRange -}}
{{- $range := splitList "-" . -}}
{{- $min := atoi (first $range) -}}
{{- $max := atoi (last $range) -}}
{{- if or (ne (len $range) 2) (lt $min 1024) (gt $max 65535) (gt $min $max) -}}
{{- fail (printf "agent.snatPortRange: %q is not MIN-MAX with 1024 <= MIN <= MAX <= 65535" .) -}}
{{- end -}}
{{- end -}}
{{- range $flag, $key := dict "--external-cluster-ip" "externalClusterIp" "--service-counters" "serviceCounters" -}}
{{- $v := index $a $key -}}
{{- if not (kindIs "invalid" $v) -}}
{{- $args = concat $args (list $flag (toString $v)) -}}
{{- end -}}
{{- end -}}
{{- $args = concat $args $a.extraArgs -}}
{{- toYaml $args -}}
{{- end -}}
