{{/* The pools.yaml of one nodePools entry, as cmd/csi-dmthin reads it. */}}
{{- define "csi-dmthin.poolsYAML" -}}
{{- $cfg := dict "pools" .pools -}}
{{- if .defaultPool -}}
{{- $_ := set $cfg "defaultPool" .defaultPool -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
