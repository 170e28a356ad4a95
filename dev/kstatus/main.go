// Command kstatus prints the health that kstatus computes for Kubernetes objects: the library
// Flux's kustomize-controller uses for its health checks (sigs.k8s.io/cli-utils/pkg/kstatus/status).
//
// Input on stdin: a JSON array of objects, or a List ({"kind": "List", "items": [...]}).
// Output on stdout: a JSON array with one {"status", "message"} per object, in input order.
// Built by dev/finetune_dev/binaries.py; run by tests/integration/test_gitops_kstatus.py.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	items, err := objects(data)
	if err != nil {
		return err
	}
	results := make([]result, 0, len(items))
	for i, raw := range items {
		// Unstructured's own decoder keeps integers as int64, as kstatus expects of
		// metadata.generation and status.observedGeneration.
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(raw); err != nil {
			return fmt.Errorf("object %d: %w", i, err)
		}
		res, err := status.Compute(obj)
		if err != nil {
			return fmt.Errorf("object %d (%s): %w", i, obj.GetName(), err)
		}
		results = append(results, result{Status: res.Status.String(), Message: res.Message})
	}
	return json.NewEncoder(out).Encode(results)
}

// objects splits the input into one raw JSON document per object.
func objects(data []byte) ([]json.RawMessage, error) {
	var items []json.RawMessage
	if err := json.Unmarshal(data, &items); err == nil {
		return items, nil
	}
	var list struct {
		Items *[]json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(data, &list); err != nil || list.Items == nil {
		return nil, fmt.Errorf("stdin must hold a JSON array of objects or a List with items")
	}
	return *list.Items, nil
}
